"""End to end: train on generated data, then check the whole submission contract and the artifacts, predict
and score from them, the README's score command among them."""

import json
import math
import shlex
import shutil
import types

import cv2
import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from conftest import TINY_RUN, readme_commands, script


def test_submission_contract(tiny_dataset, tiny_run):
    submission = pd.read_csv(tiny_run / "submission.csv", dtype={"row_id": str})
    test = pd.read_csv(tiny_dataset / "test.csv", dtype={"row_id": str})
    assert list(submission.columns) == ["row_id", *script.CLASS_NAMES]
    assert submission["row_id"].tolist() == test["row_id"].tolist()
    probabilities = submission[list(script.CLASS_NAMES)].to_numpy()
    assert np.isfinite(probabilities).all()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)


def test_artifacts_written(tiny_run):
    for name in ("model.keras", "history.csv", "config.json", "oof.csv", "metrics.json"):
        assert (tiny_run / name).is_file(), name
    history = pd.read_csv(tiny_run / "history.csv")
    assert history["phase"].tolist() == [1, 2]
    assert not list(tiny_run.glob(".partial-*")), "temporary files must not be left behind"


def test_saved_model_loads_with_the_trained_input_size(tiny_run):
    """model.keras loads on its own (safe mode) and maps 32-px RGB inputs to three class probabilities."""
    model = keras.models.load_model(tiny_run / "model.keras", safe_mode=True)
    assert model.input_shape == (None, 32, 32, 3)
    assert model.output_shape == (None, len(script.CLASS_NAMES))


def test_history_records_every_epoch_of_both_phases(tiny_run):
    """One row per epoch, numbered on across the phases from 1 (as the log's "Epoch 1/2"), with finite training and
    validation losses."""
    history = pd.read_csv(tiny_run / "history.csv")
    assert history["epoch"].tolist() == [1, 2]
    assert np.isfinite(history[["loss", "val_loss"]].to_numpy()).all()


def test_config_records_the_resolved_options_and_library_versions(tiny_dataset, tiny_run, monkeypatch):
    """config.json holds every option as the run resolved it, defaults included, and the library versions."""
    monkeypatch.setattr(script, "in_notebook", lambda: False)
    config = json.loads((tiny_run / "config.json").read_text())
    _, options = script.parse_arguments([*TINY_RUN, "--data-dir", str(tiny_dataset), "--output-dir", str(tiny_run)])
    assert config["options"] == json.loads(json.dumps(vars(options)))
    assert (config["options"]["epochs"], config["options"]["seed"]) == (1, script.SEED)
    assert config["options"]["class_weights"] == list(script.CLASS_WEIGHTS)
    model = config["severity_model"]
    assert model["fine_tune_layers"] == script.FINE_TUNE_LAYERS
    assert model["augmentation"] == script.AUGMENTATION
    assert model["weights"] == "none" and model["image_size"] == options.image_size
    expected_versions = {
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "pandas": pd.__version__,
        "opencv": cv2.__version__,
    }
    assert expected_versions.items() <= config["versions"].items()


def validation_row_ids(tiny_dataset, tiny_run):
    """The row_ids the run held out, recomputed from its recorded split options."""
    options = json.loads((tiny_run / "config.json").read_text())["options"]
    table = script.load_train_table(tiny_dataset)
    _, validation_rows = script.split_folds(table, 1, options["val_fraction"], options["seed"])[0]
    return table["row_id"][validation_rows]


def test_oof_covers_exactly_the_validation_rows(tiny_dataset, tiny_run):
    """oof.csv has one probability row for each held-out row and for no training row."""
    oof = pd.read_csv(tiny_run / "oof.csv", dtype={"row_id": str})
    assert list(oof.columns) == ["row_id", *script.CLASS_NAMES]
    assert sorted(oof["row_id"]) == sorted(validation_row_ids(tiny_dataset, tiny_run))
    np.testing.assert_allclose(oof[list(script.CLASS_NAMES)].sum(axis=1), 1.0, atol=1e-5)


def test_metrics_score_the_oof_predictions(tiny_dataset, tiny_run):
    """metrics.json's score is finite and is the competition metric of oof.csv against the true labels."""
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    oof = pd.read_csv(tiny_run / "oof.csv", dtype={"row_id": str})
    labels = pd.read_csv(tiny_dataset / "train.csv", dtype={"row_id": str}).drop(columns="image_path")
    assert math.isfinite(metrics["score"])
    assert metrics["rows"] == len(oof)
    expected = script.score_predictions(labels[labels["row_id"].isin(oof["row_id"])], oof)["score"]
    assert metrics["score"] == pytest.approx(expected, rel=1e-9)


def test_the_readmes_score_command_works_as_printed(tiny_dataset, tiny_run, tmp_path, monkeypatch, capsys):
    """`python script.py score --solution train.csv --submission oof.csv ...`, run as printed in a folder holding a
    run's train.csv and oof.csv, scores the validated rows (it used to fail: oof.csv lacks the training rows)."""
    commands = [command for command in readme_commands("python script.py score") if "oof.csv" in command]
    assert commands, "the README shows how to score oof.csv"
    shutil.copy(tiny_dataset / "train.csv", tmp_path / "train.csv")
    shutil.copy(tiny_run / "oof.csv", tmp_path / "oof.csv")
    monkeypatch.chdir(tmp_path)
    for command in commands:
        assert script.main(shlex.split(command)[2:]) == 0, command
        printed = capsys.readouterr().out
        scores = script.json.loads(printed.strip().splitlines()[-1])
        reported = script.json.loads((tiny_run / "metrics.json").read_text())
        assert scores["score"] == pytest.approx(reported["score"], abs=1e-6)
        assert "labelled row(s) of the solution left out" in printed


def test_predict_reproduces_the_training_submission(tiny_dataset, tiny_run, tmp_path):
    """`predict --model` alone gives the training run's submission: same rows, probabilities within 1e-4.
    No --image-size is passed, so the 32 px must come from the model (the default is 224)."""
    exit_code = script.main(
        [
            "predict",
            "--model",
            str(tiny_run / "model.keras"),
            "--data-dir",
            str(tiny_dataset),
            "--output-dir",
            str(tmp_path),
        ]
    )
    assert exit_code == 0
    trained = pd.read_csv(tiny_run / "submission.csv", dtype={"row_id": str})
    predicted = pd.read_csv(tmp_path / "submission.csv", dtype={"row_id": str})
    assert predicted["row_id"].tolist() == trained["row_id"].tolist()
    np.testing.assert_allclose(predicted[list(script.CLASS_NAMES)], trained[list(script.CLASS_NAMES)], atol=1e-4)


def test_predict_mixes_the_crops_a_row_lists_by_their_weights(tiny_dataset, tiny_run, tmp_path):
    """A test.csv with crop_weight may list a row_id once per crop: its prediction is the weighted mean of theirs,
    each as the model predicts it alone; where their weights sum to less than 1, the rest is the row's best constant,
    all of it for a row whose crops all lack an image."""
    test = pd.read_csv(tiny_dataset / "test.csv", dtype=str)
    first, second, third = test["row_id"][:3]
    paths = [str(tiny_dataset / path) for path in test["image_path"][:3]]
    mixed_dir = tmp_path / "mixed"
    mixed_dir.mkdir()
    weighted = pd.DataFrame(
        {
            "row_id": [first, first, second, third, third],
            "image_path": [paths[0], paths[1], paths[1], "", ""],
            script.CROP_WEIGHT: [3.0, 1.0, 0.5, 1.0, 2.0],
        }
    )
    weighted.to_csv(mixed_dir / "test.csv", index=False)
    model = str(tiny_run / "model.keras")
    assert (
        script.main(["predict", "--model", model, "--data-dir", str(mixed_dir), "--output-dir", str(tmp_path / "a")])
        == 0
    )
    mixed = pd.read_csv(tmp_path / "a" / "submission.csv", dtype={"row_id": str}).set_index("row_id")
    assert mixed.index.tolist() == [first, second, third]
    options = types.SimpleNamespace(batch_size=8, workers=1, predict_mirrored=script.PREDICT_MIRRORED)
    alone = script.predict_probabilities(script.load_saved_model(tiny_run / "model.keras"), paths[:2], options)[0]
    np.testing.assert_allclose(mixed.loc[first], 0.75 * alone[0] + 0.25 * alone[1], atol=1e-3)
    saved = json.loads((tiny_run / "config.json").read_text())["best_constants"]
    constant = script.constant_predictions(
        pd.Series([second, third]), {key: np.array(value) for key, value in saved.items()}
    )
    np.testing.assert_allclose(mixed.loc[second], 0.5 * alone[1] + 0.5 * constant[0], atol=1e-3)
    np.testing.assert_allclose(mixed.loc[third], constant[1], atol=1e-3)

    weighted.loc[1, script.CROP_WEIGHT] = 0.0
    weighted.to_csv(mixed_dir / "test.csv", index=False)
    assert (
        script.main(["predict", "--model", model, "--data-dir", str(mixed_dir), "--output-dir", str(tmp_path / "b")])
        == 2
    )
    assert not (tmp_path / "b").exists()
