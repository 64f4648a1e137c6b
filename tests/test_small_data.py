"""Small data gets a holdout, not a refusal: with two or more studies at least one whole study is held out for
validation whatever --val-fraction asks; only a single study (or more folds than studies) is refused, in terms of
the option the user passed."""

import numpy as np
import pandas as pd
import pytest
import synthetic
from conftest import QUICK_RUN, script

ROWS_PER_SMALL_STUDY = 4  # As few rows per study as a user with a handful of slices might have.


def small_table(studies, seed=0):
    """A train table of `studies` competition studies with ROWS_PER_SMALL_STUDY rows each, random labels."""
    rng = np.random.default_rng(seed)
    row_ids = [
        f"{1000 + study}_{column}"
        for study in range(studies)
        for column in script.WIDE_LABEL_COLUMNS[:ROWS_PER_SMALL_STUDY]
    ]
    return pd.DataFrame({"row_id": row_ids, "label": rng.integers(0, len(script.CLASS_NAMES), len(row_ids))})


@pytest.mark.parametrize("studies", [2, 3, 4, 5, 7])
@pytest.mark.parametrize("val_fraction", [0.05, 0.2, 0.5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_two_or_more_studies_hold_out_at_least_one_whole_study(studies, val_fraction, seed):
    table = small_table(studies, seed)
    ((train_rows, validation_rows),) = script.split_folds(table, 1, val_fraction, seed)
    train_studies = set(script.study_ids(table["row_id"][train_rows]))
    validation_studies = set(script.study_ids(table["row_id"][validation_rows]))
    assert validation_studies and train_studies
    assert not train_studies & validation_studies
    assert len(train_rows) + len(validation_rows) == len(table)


def test_one_study_is_refused_in_terms_of_val_fraction():
    with pytest.raises(script.InputError, match=r"one study.*--val-fraction 0\.2.*--val-fraction 0"):
        script.split_folds(small_table(1), 1, 0.2, 0)


def test_one_study_trains_on_everything_with_val_fraction_zero():
    ((train_rows, validation_rows),) = script.split_folds(small_table(1), 1, 0.0, 0)
    assert len(train_rows) == ROWS_PER_SMALL_STUDY and len(validation_rows) == 0


def test_more_folds_than_studies_is_refused_in_terms_of_folds():
    with pytest.raises(script.InputError, match=r"4 studies cannot be split into 5 folds \(--folds 5\)"):
        script.split_folds(small_table(4), 5, 0.2, 0)


@pytest.mark.parametrize("folds", [2, 3])
def test_k_folds_on_few_studies_validate_every_row_once(folds):
    table = small_table(3)
    pairs = script.split_folds(table, folds, 0.2, 0)
    validated = np.concatenate([validation for _, validation in pairs])
    assert len(pairs) == folds and sorted(validated) == list(range(len(table)))


def test_sixteen_images_in_four_studies_train_from_scratch_and_submit(tmp_path):
    """The default --val-fraction on 4 studies of 4 images: trains both phases and writes a valid submission."""
    root = tmp_path / "data"
    synthetic.make_dataset(root, train_studies=4, test_studies=1, image_size=64, seed=5)
    train = pd.read_csv(root / "train.csv", dtype=str)
    keep = train.groupby(script.study_ids(train["row_id"]).to_numpy()).head(ROWS_PER_SMALL_STUDY)
    keep.to_csv(root / "train.csv", index=False)
    output_dir = tmp_path / "run"
    # Random weights from a file train fastest; the from-scratch path is the learning test's and TINY_RUN's.
    argv = [*QUICK_RUN, "--fine-tune-epochs", "1", "--data-dir", str(root), "--output-dir", str(output_dir)]
    assert script.main(argv) == 0
    submission = pd.read_csv(output_dir / "submission.csv", dtype={"row_id": str})
    test = pd.read_csv(root / "test.csv", dtype=str)
    assert submission["row_id"].tolist() == test["row_id"].tolist()
    probabilities = submission[list(script.CLASS_NAMES)].to_numpy()
    assert np.isfinite(probabilities).all()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
