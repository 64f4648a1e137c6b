"""The time estimate a long training run prints before it starts: by stage, from a quick measurement, and what to
change when it would pass a Kaggle notebook's limit."""

import types

import numpy as np
import pytest
from conftest import script


def rows_of_studies(count):
    """Row ids of `count` studies, one row each."""
    return script.pd.Series([f"{number}_spinal_canal_stenosis_l1_l2" for number in range(count)])


def test_five_folds_train_on_four_fifths_of_the_rows_five_times(monkeypatch, capsys):
    monkeypatch.setattr(script, "training_seconds_per_image", lambda image_size: 0.5)
    settings = types.SimpleNamespace(image_size=224, epochs=5, fine_tune_epochs=3)
    options = types.SimpleNamespace(folds=5, val_fraction=0.2, workers=2)
    hours = script.print_time_estimate(settings, None, rows_of_studies(2_000), options, None)
    assert hours == pytest.approx(2_000 * 4 * 8 * 0.5 / 3600)


def test_a_run_beyond_kaggles_limit_says_so_and_what_to_change(monkeypatch, capsys):
    monkeypatch.setattr(script, "training_seconds_per_image", lambda image_size: 0.5)
    settings = types.SimpleNamespace(image_size=224, epochs=5, fine_tune_epochs=3)
    options = types.SimpleNamespace(folds=1, val_fraction=0.2, workers=2)
    rows = rows_of_studies(12_500)  # 10,000 of them train
    assert script.print_time_estimate(settings, None, rows, options, None) == pytest.approx(10_000 * 8 * 0.5 / 3600)
    line = capsys.readouterr().out
    assert line.startswith("estimate: about 11.1 h on this machine (severity model 11.1 h)")
    assert "beyond a Kaggle notebook's 9-hour limit" in line and "--epochs" in line and "--image-size" in line


def test_the_localiser_and_the_dicoms_are_counted_by_stage(monkeypatch, capsys, tmp_path):
    """The localiser's epochs of slices (three series kinds per study, at least its minimum an epoch) at its input
    size, and the reading of the competition's files (by --workers processes), each as its own stage."""
    sizes = []
    monkeypatch.setattr(script, "training_seconds_per_image", lambda image_size: sizes.append(image_size) or 0.01)
    monkeypatch.setattr(script, "reading_seconds", lambda competition: 3600.0)  # for one worker
    _, options = script.parse_arguments([])
    localiser = script.localiser_settings(options)
    settings = types.SimpleNamespace(image_size=224, epochs=5, fine_tune_epochs=3)
    options = types.SimpleNamespace(folds=1, val_fraction=0.25, workers=2)
    hours = script.print_time_estimate(settings, localiser, rows_of_studies(400), options, tmp_path)
    slices = localiser.localiser_epochs * max(
        3 * 300 * localiser.localiser_slices_per_study, localiser.localiser_min_slices_per_epoch
    )
    localiser_hours = slices * script.LOCALISER_STEP_COST * 0.01 / 3600
    assert hours == pytest.approx(0.5 + localiser_hours + 300 * 8 * 0.01 / 3600)
    assert sizes == [localiser.localiser_image_size, 224]
    assert "reading the DICOMs 0.5 h" in capsys.readouterr().out


def test_a_small_run_is_not_measured(monkeypatch, capsys):
    monkeypatch.setattr(script, "training_seconds_per_image", lambda image_size: pytest.fail("measured"))
    settings = types.SimpleNamespace(image_size=64, epochs=1, fine_tune_epochs=0)
    options = types.SimpleNamespace(folds=1, val_fraction=0.2, workers=2)
    assert script.print_time_estimate(settings, None, rows_of_studies(250), options, None) is None
    assert capsys.readouterr().out == ""


def test_the_probe_times_a_real_training_step():
    seconds = script.training_seconds_per_image(32, batch=2)
    assert np.isfinite(seconds) and seconds > 0


class EnoughSeen(Exception):
    """Raised where a test has seen what it needs."""


def test_a_competition_run_estimates_before_it_reads_a_dicom(monkeypatch, tmp_path):
    """The estimate comes from the competition's labels, so it is printed before the pass over the DICOMs, which at
    the competition's scale is itself a long stage."""
    import dicom_synthetic

    competition = dicom_synthetic.write_synthetic_competition(tmp_path / "competition").root
    events = []

    def estimate(settings, localiser, row_ids, options, where):
        events.append(("estimate", len(row_ids), where))

    def read(*arguments, **keywords):
        events.append(("read",))
        raise EnoughSeen

    monkeypatch.setattr(script, "print_time_estimate", estimate)
    monkeypatch.setattr(script, "prepare_training_split", read)
    with pytest.raises(EnoughSeen):
        script.main(["--data-dir", str(competition), "--output-dir", str(tmp_path / "out"), "--weights", "none"])
    labelled = script.read_split_rows(competition, "train", None)[0]
    assert events == [("estimate", len(labelled), competition), ("read",)] and len(labelled) > 0
