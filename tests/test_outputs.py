"""The output folder: a run owns its outputs (an earlier run's are removed and named, the user's own files and
anything outside the folder are kept), config.json lists what the run wrote and predict follows it, --no-test
writes no submission, and training_curves.png marks the epoch each fold kept."""

import contextlib
import io

import pandas as pd
import pytest
from conftest import QUICK_RUN, script

EARLIER_RUN_FILES = (
    "model_fold1.keras",
    "model_fold2.keras",
    "oof.csv",
    "metrics.json",
    "training_curves.png",
    "confusion_matrix.png",
    "submission.csv",
    "history.csv",
)


@pytest.fixture(scope="module")
def run_over_an_earlier_run(tiny_dataset, tmp_path_factory):
    """A --val-fraction 0 --no-test --epochs 1 run into a folder that an earlier --folds 2 run left its outputs in,
    beside a file of the user's own; returns (output folder, stdout)."""
    output_dir = tmp_path_factory.mktemp("earlier_run")
    for name in EARLIER_RUN_FILES:
        (output_dir / name).write_text("from the earlier run\n")
    earlier_outputs = [*EARLIER_RUN_FILES, "config.json", "earlier_extra.csv", "../outside.txt"]
    (output_dir / "config.json").write_text(script.json.dumps({"outputs": earlier_outputs}))
    (output_dir / "earlier_extra.csv").write_text("listed by the earlier run\n")
    (output_dir / "notes.txt").write_text("the user's own\n")
    (output_dir.parent / "outside.txt").write_text("outside the output folder\n")
    argv = [*QUICK_RUN, "--val-fraction", "0", "--no-test", "--data-dir", str(tiny_dataset)]
    capture = io.StringIO()
    with contextlib.redirect_stdout(capture):
        assert script.main([*argv, "--output-dir", str(output_dir)]) == 0
    return output_dir, capture.getvalue()


def test_a_new_run_removes_an_earlier_runs_outputs_and_names_them(run_over_an_earlier_run):
    """Nothing of the earlier run is left beside the new model.keras, the user's own file and anything outside
    the folder are kept, and the run said what it removed."""
    output_dir, printed = run_over_an_earlier_run
    assert sorted(path.name for path in output_dir.iterdir()) == [
        "config.json",
        "history.csv",
        "model.keras",
        "notes.txt",
    ]
    assert (output_dir.parent / "outside.txt").is_file()
    assert "removed an earlier run's outputs" in printed and "model_fold2.keras" in printed and "oof.csv" in printed


def test_config_lists_the_runs_outputs_and_predict_follows_it(run_over_an_earlier_run, tiny_dataset, tmp_path):
    """config.json names exactly the files the run wrote, and `predict --model OUTPUT_DIR` uses its models."""
    output_dir, _ = run_over_an_earlier_run
    config = script.json.loads((output_dir / "config.json").read_text())
    assert config["outputs"] == ["model.keras", "history.csv", "config.json"]
    predicted = tmp_path / "predicted"
    argv = ["predict", "--model", str(output_dir), "--data-dir", str(tiny_dataset), "--output-dir", str(predicted)]
    assert script.main(argv) == 0
    assert len(pd.read_csv(predicted / "submission.csv")) == len(pd.read_csv(tiny_dataset / "test.csv"))


def test_no_test_writes_no_submission_and_every_epoch_has_its_header(run_over_an_earlier_run):
    """--no-test trains without a test set and says so; with --epochs 1 the log still heads the epoch
    ("Epoch 1/1"), and history.csv counts it as epoch 1."""
    output_dir, printed = run_over_an_earlier_run
    assert "no test set (--no-test)" in printed and not (output_dir / "submission.csv").exists()
    assert "Epoch 1/1\n" in printed
    assert pd.read_csv(output_dir / "history.csv")["epoch"].tolist() == [1]


def test_training_curves_mark_the_kept_epoch(tmp_path, monkeypatch):
    """training_curves.png marks, per fold, the epoch whose weights were kept: the first lowest validation loss."""
    history = pd.DataFrame(
        {
            "fold": [1, 1, 1, 2, 2, 2],
            "phase": [1, 1, 2, 1, 1, 2],
            "epoch": [1, 2, 3, 1, 2, 3],
            "loss": [1.0, 0.8, 0.7, 1.0, 0.9, 0.8],
            "accuracy": [0.5, 0.6, 0.7, 0.5, 0.6, 0.7],
            "val_loss": [0.9, 0.5, 0.5, 0.9, 0.8, 0.4],
            "val_accuracy": [0.5, 0.7, 0.6, 0.5, 0.6, 0.8],
        }
    )
    assert script.kept_epochs(history) == {1: 2, 2: 3}
    figures = {}
    write_atomically = script.write_atomically

    def keep_figure(path, write):
        figures[path.name] = write.__self__
        write_atomically(path, write)

    monkeypatch.setattr(script, "write_atomically", keep_figure)
    paths = script.save_plots(history, {"confusion_matrix": [[1, 0, 0], [0, 1, 0], [0, 0, 1]]}, tmp_path)
    assert paths["training_curves"].is_file()
    loss_axis, accuracy_axis = figures["training_curves.png"].axes
    marks = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in loss_axis.get_lines()}
    assert marks["fold 1 kept: epoch 2"] == ([2], [0.5]) and marks["fold 2 kept: epoch 3"] == ([3], [0.4])
    accuracy_marks = {line.get_label(): list(line.get_ydata()) for line in accuracy_axis.get_lines()}
    assert accuracy_marks["fold 1 kept: epoch 2"] == [0.7]
