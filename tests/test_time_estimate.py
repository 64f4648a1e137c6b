"""The time estimate a long training run prints before it starts: by stage, from a quick measurement, and what to
change when it would pass a Kaggle notebook's limit."""

import types

import numpy as np
import pytest
from conftest import script


def test_a_run_beyond_kaggles_limit_says_so_and_what_to_change(monkeypatch, capsys):
    monkeypatch.setattr(script, "training_seconds_per_image", lambda image_size: 0.5)
    run = types.SimpleNamespace(
        settings=types.SimpleNamespace(image_size=224, epochs=5, fine_tune_epochs=3),
        localiser_settings=None,
        folds=[(np.arange(10_000), np.arange(100))],
    )
    assert script.print_time_estimate(run, None) == pytest.approx(10_000 * 8 * 0.5 / 3600)
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
    table = script.pd.DataFrame({"row_id": [f"{number}_spinal_canal_stenosis_l1_l2" for number in range(400)]})
    run = types.SimpleNamespace(
        settings=types.SimpleNamespace(image_size=224, epochs=5, fine_tune_epochs=3),
        localiser_settings=localiser,
        folds=[(np.arange(300), np.arange(300, 400))],
        table=table,
        options=types.SimpleNamespace(workers=2),
    )
    hours = script.print_time_estimate(run, tmp_path)
    slices = localiser.localiser_epochs * max(3 * 300 * localiser.localiser_slices_per_study, 192)
    localiser_hours = slices * script.LOCALISER_STEP_COST * 0.01 / 3600
    assert hours == pytest.approx(0.5 + localiser_hours + 300 * 8 * 0.01 / 3600)
    assert sizes == [localiser.localiser_image_size, 224]
    assert "reading the DICOMs 0.5 h" in capsys.readouterr().out


def test_a_small_run_is_not_measured(monkeypatch, capsys):
    monkeypatch.setattr(script, "training_seconds_per_image", lambda image_size: pytest.fail("measured"))
    run = types.SimpleNamespace(
        settings=types.SimpleNamespace(image_size=64, epochs=1, fine_tune_epochs=0),
        localiser_settings=None,
        folds=[(np.arange(200), np.arange(50))],
    )
    assert script.print_time_estimate(run, None) is None
    assert capsys.readouterr().out == ""


def test_the_probe_times_a_real_training_step():
    seconds = script.training_seconds_per_image(32, batch=2)
    assert np.isfinite(seconds) and seconds > 0
