"""The two Kaggle notebooks, played in fake Kaggle trees (script.KAGGLE_ROOT) over a synthetic competition.

The training notebook attaches the competition and passes no --data-dir or --output-dir. Its run is interrupted
twice, as a closed notebook or a timed-out session would interrupt it: once during the localiser's training and
once after the localiser finished; --resume continues each from its last finished epoch and never trains a
finished localiser again. The whole output folder is then uploaded as a dataset and attached, with the competition,
to the internet-off submission notebook, where Kaggle swaps in the hidden test studies: `predict --model FOLDER`
and `predict --model FOLDER/model.keras` must write all 25 rows of every hidden study, most of them cropped at the
points the localiser found, never the uploaded prepared/test.csv of the training run's public test studies.
"""

import contextlib
import io
import json
import shutil

import anatomy_synthetic as A
import numpy as np
import pandas as pd
import pytest
from conftest import RANDOM_WEIGHTS, script

COMPETITION_SLUG = "rsna-2024-lumbar-spine-degenerative-classification"
# Random weights from a file (the base frozen) train the severity model fastest; nothing here asks it to learn.
TRAINING_NOTEBOOK = [
    "--weights",
    str(RANDOM_WEIGHTS),
    *(
        "--image-size 32 --epochs 1 --fine-tune-epochs 0 --batch-size 16 --localiser-epochs 2 "
        "--localiser-image-size 64 --seed 0"
    ).split(),
]


class Interrupt:
    """Raises KeyboardInterrupt where a run is to be stopped, as Ctrl-C at the end of a batch would."""

    def __init__(self, monkeypatch):
        self.monkeypatch = monkeypatch

    def after_first_localiser_epoch(self):
        save_epoch = script.SaveProgress.on_epoch_end

        def save_then_stop(callback, epoch, logs=None):
            save_epoch(callback, epoch, logs)
            if callback.state.fold_dir.name == "localiser" and epoch == 0:
                raise KeyboardInterrupt

        self.monkeypatch.setattr(script.SaveProgress, "on_epoch_end", save_then_stop)

    def at_the_first_severity_fold(self):
        def stop(*arguments):
            raise KeyboardInterrupt

        self.monkeypatch.setattr(script, "run_fold", stop)


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    """The training notebook's Kaggle tree and the submission notebook's, each with its competition attached: the
    same training studies, but the submission's competition holds other test studies, as Kaggle's rerun does."""
    root = tmp_path_factory.mktemp("kaggle_notebooks")
    training = root / "training" / "input" / COMPETITION_SLUG
    A.write_anatomical_competition(training, train_studies=5, test_studies=1, seed=3, image_size=64)
    hidden = A.write_anatomical_competition(root / "hidden", train_studies=1, test_studies=2, seed=4, image_size=64)
    submission = root / "submission" / "input" / COMPETITION_SLUG
    shutil.copytree(training, submission)
    for name in ("test_images", "test_series_descriptions.csv", "sample_submission.csv"):
        shutil.rmtree(submission / name) if (submission / name).is_dir() else (submission / name).unlink()
        copy = shutil.copytree if (hidden.root / name).is_dir() else shutil.copy
        copy(hidden.root / name, submission / name)
    return root / "training", root / "submission", hidden


def in_notebook(kaggle_root, monkeypatch, argv):
    """Run the script as a notebook cell in a Kaggle tree: its working/ the current folder; returns the exit code."""
    monkeypatch.setattr(script, "KAGGLE_ROOT", kaggle_root)
    (kaggle_root / "working").mkdir(exist_ok=True)
    monkeypatch.chdir(kaggle_root / "working")
    return script.main(argv)


def run_captured(kaggle_root, monkeypatch, argv):
    """in_notebook, with what it printed: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        exit_code = in_notebook(kaggle_root, monkeypatch, argv)
    return exit_code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def trained(trees):
    """The training notebook, interrupted during its localiser's training and after the localiser finished, and
    resumed each time. Returns its working folder, each run's (exit code, stdout, stderr), the localiser's progress
    after the first run, and the calls to decode slices in the last run."""
    training_root, _, _ = trees
    runs, decoded = [], []
    with pytest.MonkeyPatch.context() as monkeypatch:
        Interrupt(monkeypatch).after_first_localiser_epoch()
        runs.append(run_captured(training_root, monkeypatch, TRAINING_NOTEBOOK))
    progress = script.Progress.load(training_root / "working" / ".resume" / "localiser")
    with pytest.MonkeyPatch.context() as monkeypatch:
        Interrupt(monkeypatch).at_the_first_severity_fold()
        runs.append(run_captured(training_root, monkeypatch, [*TRAINING_NOTEBOOK, "--resume"]))
    with pytest.MonkeyPatch.context() as monkeypatch:

        def never(*arguments):
            raise AssertionError("the finished localiser was trained again")

        def counted(*arguments):
            decoded.append(arguments)
            return read_volume(*arguments)

        read_volume = script.read_volume
        monkeypatch.setattr(script, "fit_localiser", never)
        monkeypatch.setattr(script, "read_volume", counted)
        cached = {path: path.stat().st_mtime_ns for path in (training_root / "working" / "cache").rglob("*.npy")}
        runs.append(run_captured(training_root, monkeypatch, [*TRAINING_NOTEBOOK, "--resume"]))
    # Slices are decoded in worker processes, where the count above cannot see them: a decoded study's slices would
    # also be written to the cache again.
    decoded += [path for path, written in cached.items() if path.stat().st_mtime_ns != written]
    return training_root / "working", runs, progress, decoded


def test_the_training_notebook_finds_the_competition_and_writes_to_working(trees, trained):
    working, runs, _, _ = trained
    assert [exit_code for exit_code, _, _ in runs] == [130, 130, 0]
    assert "kaggle:  using the competition in" in runs[0][1]
    for name in ("model.keras", "localiser.keras", "localiser.json", "config.json", "submission.csv"):
        assert (working / name).is_file(), name
    assert not (working / ".resume").exists()
    submission = pd.read_csv(working / "submission.csv", dtype={"row_id": str})
    assert len(submission) == len(script.WIDE_LABEL_COLUMNS)  # The one public test study.


def test_a_localiser_interrupted_mid_training_goes_on_from_its_last_finished_epoch(trained):
    """Ctrl-C during the localiser's training says what is true: its last finished epoch is saved, and --resume goes
    on after it rather than from the start."""
    _, runs, progress, _ = trained
    assert "The state after the last finished epoch is saved" in runs[0][2]
    assert progress.backup_epoch == 1 and not progress.done
    resumed = runs[1][1]
    assert "resuming at the localiser, epoch 2" in resumed and "resuming phase 1 after epoch 1" in resumed
    assert "Epoch 1/2" not in resumed and "Epoch 2/2" in resumed


def test_a_resumed_run_trains_a_finished_localiser_never_again_and_reads_its_slices_from_the_cache(trained):
    """The third run trained no localiser (fit_localiser would have failed it) and decoded no DICOM for it: the
    test studies' slices, which the second run localised, came from the cache."""
    working, runs, _, decoded = trained
    assert "localiser: finished before the interruption" in runs[2][1]
    assert decoded == []
    assert list((working / "cache" / "test_slices").glob("*.npy"))


@pytest.mark.parametrize("model", ["FOLDER", "FOLDER/model.keras"])
def test_the_submission_notebook_predicts_the_hidden_test_studies_at_found_points(trees, trained, model, monkeypatch):
    """With the competition and the whole output folder attached, predict takes the competition's hidden test
    studies (not the uploaded prepared/test.csv), finds the localiser in the folder, and fills every row, most of
    them at found points rather than the best constants."""
    _, submission_root, hidden = trees
    working = trained[0]
    uploaded = submission_root / "input" / "my-spine-model"
    if not uploaded.exists():
        shutil.copytree(working, uploaded)
    shutil.rmtree(submission_root / "working", ignore_errors=True)
    argv = ["predict", "--model", model.replace("FOLDER", str(uploaded))]
    assert in_notebook(submission_root, monkeypatch, argv) == 0
    submission = pd.read_csv(submission_root / "working" / "submission.csv", dtype={"row_id": str})
    expected = {f"{study}_{column}" for study in hidden.test_study_ids for column in script.WIDE_LABEL_COLUMNS}
    assert set(submission["row_id"]) == expected and len(submission) == len(expected)
    saved = json.loads((uploaded / "config.json").read_text())["best_constants"]
    constants = {key: np.array(value) for key, value in saved.items()}
    at_constant = np.isclose(
        submission[list(script.CLASS_NAMES)].to_numpy(), script.constant_predictions(submission["row_id"], constants)
    ).all(axis=1)
    assert at_constant.mean() < 0.5  # Most rows graded at found points, not their best constant.


def submission_tree(trees, trained, tmp_path, dataset, files):
    """A new fake Kaggle tree: the competition attached, and a dataset holding only `files` of the training run's
    output folder. Returns (the tree's root, the dataset's folder)."""
    kaggle = tmp_path / "kaggle"
    competition = trees[1] / "input" / COMPETITION_SLUG
    shutil.copytree(competition, kaggle / "input" / COMPETITION_SLUG, symlinks=True)
    uploaded = kaggle / "input" / dataset
    uploaded.mkdir()
    for name in files:
        shutil.copy(trained[0] / name, uploaded / name)
    return kaggle, uploaded


def test_the_submission_notebook_without_a_localiser_refuses_unless_asked_for_constants(
    trees, trained, tmp_path, monkeypatch, capsys
):
    """Only model.keras and config.json uploaded: predict exits 2 naming where it looked, and writes nothing;
    --localiser none submits the best constants on purpose, and says so."""
    hidden = trees[2]
    kaggle, uploaded = submission_tree(trees, trained, tmp_path, "only-the-model", ("model.keras", "config.json"))
    assert in_notebook(kaggle, monkeypatch, ["predict", "--model", str(uploaded)]) == 2
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and str(uploaded / "localiser.keras") in message and "--localiser none" in message
    assert not (kaggle / "working" / "submission.csv").exists()
    assert in_notebook(kaggle, monkeypatch, ["predict", "--model", str(uploaded), "--localiser", "none"]) == 0
    assert "--localiser none" in capsys.readouterr().out
    submission = pd.read_csv(kaggle / "working" / "submission.csv", dtype={"row_id": str})
    assert len(submission) == len(hidden.test_study_ids) * len(script.WIDE_LABEL_COLUMNS)


def test_the_submission_notebook_without_the_runs_config_refuses_before_predicting(
    trees, trained, tmp_path, monkeypatch, capsys
):
    """The models and the localiser uploaded, but not config.json with the best constants that rows without a crop
    need: predict exits 2 naming the file, before it reads a single study, and writes nothing."""
    files = ("model.keras", "localiser.keras", "localiser.json")
    kaggle, uploaded = submission_tree(trees, trained, tmp_path, "no-config", files)
    assert in_notebook(kaggle, monkeypatch, ["predict", "--model", str(uploaded / "model.keras")]) == 2
    captured = capsys.readouterr()
    assert f"{uploaded / 'config.json'}: file not found" in captured.err and "predicting" not in captured.out
    assert not (kaggle / "working" / "submission.csv").exists()
