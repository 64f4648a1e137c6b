"""The competition layout end to end: synthetic DICOM studies → prepare → train → predict → score.

Two training runs in all: one on the output of the prepare command, which the predict and score
commands then check, and one given the competition folder directly, which prepares by itself.
"""

import json

import dicom_synthetic
import numpy as np
import pandas as pd
import pytest
from conftest import QUICK_RUN, script
from synthetic import ROWS_PER_STUDY

CLASS_COLUMNS = list(script.CLASS_NAMES)

# pydicom warns about the synthetic competition's deliberately truncated file; prepare reports it instead.
pytestmark = pytest.mark.filterwarnings("ignore:End of file reached:UserWarning")


@pytest.fixture(scope="module")
def competition(tmp_path_factory):
    """Five train studies, the fewest a 20 % holdout of whole studies needs, and two test studies."""
    return dicom_synthetic.write_synthetic_competition(
        tmp_path_factory.mktemp("competition"), train_studies=5, test_studies=2
    )


@pytest.fixture(scope="module")
def prepared(competition, tmp_path_factory):
    """The prepare command's seed layout; test crops only where test_coordinates.csv has a point."""
    prepared_dir = tmp_path_factory.mktemp("prepared")
    prepare = ["prepare", "--competition-dir", str(competition.root), "--out-dir", str(prepared_dir)]
    assert script.main(prepare) == 0
    assert script.main([*prepare, "--split", "test", "--coordinates", str(competition.test_coordinates_path)]) == 0
    return prepared_dir


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory):
    """A quick training run on the prepared folder; returns its output folder."""
    output_dir = tmp_path_factory.mktemp("trained")
    assert script.main([*QUICK_RUN, "--data-dir", str(prepared), "--output-dir", str(output_dir)]) == 0
    return output_dir


@pytest.fixture(scope="module")
def trained_from_competition(competition, tmp_path_factory):
    """A quick training run given the competition folder itself; returns its output folder."""
    output_dir = tmp_path_factory.mktemp("trained_from_competition")
    assert script.main([*QUICK_RUN, "--data-dir", str(competition.root), "--output-dir", str(output_dir)]) == 0
    return output_dir


def read_csv(path):
    """A CSV with its row_ids as text and empty cells as empty text."""
    return pd.read_csv(path, dtype={"row_id": str}, keep_default_na=False)


def competition_row_ids(study_ids, conditions=script.CONDITIONS):
    """The submission row_ids, {study_id}_{condition}_{level}, of some studies and conditions."""
    return {
        f"{study_id}_{condition}_{level}"
        for study_id in study_ids
        for condition in conditions
        for level in script.LEVELS
    }


def test_prepare_writes_the_seed_layout(competition, prepared):
    """Both prepared CSVs pass the training run's own checks, and test.csv lists all 25 rows of every
    test study, with a crop exactly where a test coordinate was given (the sagittal series), except for the
    points so near a corner of these small slices that most of a 48 mm crop would be black padding."""
    assert not script.load_train_table(prepared).empty
    test = script.load_test_table(prepared)
    assert len(test) == ROWS_PER_STUDY * len(competition.test_study_ids)
    assert set(test["row_id"]) == competition_row_ids(competition.test_study_ids)
    sagittal_kinds = [
        (index, kind)
        for index, kind in enumerate(dicom_synthetic.SERIES_KINDS)
        if kind.description.startswith("Sagittal")
    ]
    mostly_padding = {
        (condition, level)
        for index, kind in sagittal_kinds
        for condition in kind.conditions
        for level_index, level in enumerate(script.LEVELS)
        if script.crop_inside_share(
            kind.shape,
            *dicom_synthetic.label_point(index, condition, level_index)[1:],
            *kind.pixel_spacing,
            script.PREPARE_CROP_MM,
        )
        < script.MINIMUM_CROP_INSIDE
    }
    assert mostly_padding, "the synthetic slices have points near their corners"
    expected = {
        f"{study_id}_{condition}_{level}"
        for study_id in competition.test_study_ids
        for _, kind in sagittal_kinds
        for condition in kind.conditions
        for level in script.LEVELS
        if (condition, level) not in mostly_padding
    }
    with_crop = test.loc[test["image_path"].notna(), "row_id"]
    assert set(with_crop) == expected


def test_predict_reproduces_the_training_submission(prepared, trained, tmp_path):
    """predict with the saved model rewrites the run's submission.csv, and the test rows without a crop get
    the best constants of the run's config.json."""
    predict = [
        "predict",
        "--model",
        str(trained / "model.keras"),
        "--data-dir",
        str(prepared),
        "--output-dir",
        str(tmp_path),
    ]
    assert script.main(predict) == 0
    original, again = read_csv(trained / "submission.csv"), read_csv(tmp_path / "submission.csv")
    assert again["row_id"].tolist() == original["row_id"].tolist()
    np.testing.assert_allclose(again[CLASS_COLUMNS].to_numpy(), original[CLASS_COLUMNS].to_numpy(), atol=1e-4)

    without_crop = (read_csv(prepared / "test.csv")["image_path"] == "").to_numpy()
    assert without_crop.any() and not without_crop.all(), "both kinds of test row are needed to tell them apart"
    saved_constants = json.loads((trained / "config.json").read_text())["best_constants"]
    constants = {location: np.array(constant) for location, constant in saved_constants.items()}
    expected = script.constant_predictions(again["row_id"][without_crop], constants)
    np.testing.assert_allclose(again[CLASS_COLUMNS].to_numpy()[without_crop], expected, atol=1e-9)


def test_score_agrees_with_the_training_report(prepared, trained, tmp_path, capsys):
    """The score command, given the validated rows' labels and oof.csv, prints the score of metrics.json."""
    out_of_fold = read_csv(trained / "oof.csv")
    train = read_csv(prepared / "train.csv")
    solution = train.loc[train["row_id"].isin(out_of_fold["row_id"]), ["row_id", *CLASS_COLUMNS]]
    assert len(solution) == len(out_of_fold)
    solution_path = tmp_path / "solution.csv"
    solution.to_csv(solution_path, index=False)
    assert script.main(["score", "--solution", str(solution_path), "--submission", str(trained / "oof.csv")]) == 0
    printed_scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    reported_scores = json.loads((trained / "metrics.json").read_text())
    assert printed_scores["score"] == pytest.approx(reported_scores["score"], abs=1e-6)


def test_training_on_the_competition_folder_prepares_it_first(competition, prepared, trained_from_competition):
    """Given the competition folder, training prepares the same rows as the prepare command into
    OUTPUT/prepared, and submits all 25 rows of every test study under the competition's row_ids."""
    pd.testing.assert_frame_equal(
        read_csv(trained_from_competition / "prepared" / "train.csv"), read_csv(prepared / "train.csv")
    )
    submission = read_csv(trained_from_competition / "submission.csv")
    assert len(submission) == ROWS_PER_STUDY * len(competition.test_study_ids)
    assert set(submission["row_id"]) == competition_row_ids(competition.test_study_ids)


def test_a_misspelt_localiser_augmentation_is_refused_before_anything_is_prepared(
    competition, tmp_path, monkeypatch, capsys
):
    """LOCALISER_AUGMENTATION is checked as AUGMENTATION is: one line naming the key, exit 2, and no output folder,
    before the competition's crops are prepared, not after the localiser has started."""
    monkeypatch.setitem(script.LOCALISER_AUGMENTATION, "rotaton_range", 10)
    output_dir = tmp_path / "output"
    assert (
        script.main(
            [
                *QUICK_RUN,
                "--localiser-epochs",
                "1",
                "--data-dir",
                str(competition.root),
                "--output-dir",
                str(output_dir),
            ]
        )
        == 2
    )
    message = capsys.readouterr().err
    assert message.startswith("error: LOCALISER_AUGMENTATION: rotaton_range not supported") and message.count("\n") == 1
    assert not output_dir.exists()
