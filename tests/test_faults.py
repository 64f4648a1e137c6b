"""Faults during a run: a killed or interrupted run resumes where it stopped (and says where it goes on), outputs
are written atomically, an output folder that cannot take the run is refused before training, an image that breaks
mid-run stops the run naming it (or is left out with --skip-bad-images), and a damaged or unsafe model file is
refused."""

import collections
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import types

import keras
import numpy as np
import pandas as pd
import pytest
import synthetic
from conftest import RANDOM_WEIGHTS, REPOSITORY, script

VALIDATION_FRACTION = 0.5  # One of the two training studies.
SMALL_RUN = [
    "--weights",
    str(RANDOM_WEIGHTS),
    "--image-size",
    "32",
    "--batch-size",
    "16",
    "--val-fraction",
    str(VALIDATION_FRACTION),
]
# Four phase-1 epochs leave time to stop a run after its first finished epoch and before phase 1 ends.
KILLED_RUN = [*SMALL_RUN, "--epochs", "4", "--fine-tune-epochs", "1"]
# The Ctrl-C tests need no phase 2, which is the slowest epoch.
STOPPED_RUN = [*SMALL_RUN, "--epochs", "4", "--fine-tune-epochs", "0"]
SHORT_RUN = [*SMALL_RUN, "--epochs", "1", "--fine-tune-epochs", "0"]
TIMEOUT_SECONDS = 300  # Generous, for a busy machine; a hung run fails the test instead of stalling the suite.
POLL_SECONDS = 0.05

StoppedRun = collections.namedtuple("StoppedRun", "data_dir output_dir exit_code stderr")


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    """Two training studies (50 rows) and one test study, 32 px."""
    root = tmp_path_factory.mktemp("small_dataset")
    synthetic.make_dataset(root, train_studies=2, test_studies=1, image_size=32, seed=3)
    return root


@pytest.fixture
def dataset(small_dataset, tmp_path):
    """A private copy of the small dataset, for tests that damage it."""
    return shutil.copytree(small_dataset, tmp_path / "data")


def training_argv(data_dir, output_dir, options):
    """The command-line arguments of a training run."""
    return [*options, "--data-dir", str(data_dir), "--output-dir", str(output_dir)]


def read_state(output_dir):
    """The first fold's saved progress, or None before the first epoch has finished."""
    try:
        return json.loads((output_dir / ".resume" / "fold1" / "state.json").read_text())
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def training_process(argv, log_dir):
    """script.py training in a process of its own, killed on the way out if the test left it running.

    Its output goes to files, so that a chatty run cannot fill a pipe and stall.
    """
    with open(log_dir / "stdout.txt", "w") as stdout, open(log_dir / "stderr.txt", "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, str(REPOSITORY / "script.py"), *argv],
            cwd=REPOSITORY,
            stdout=stdout,
            stderr=stderr,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=TIMEOUT_SECONDS)


def wait_for_first_finished_epoch(process, output_dir, log_dir):
    """Wait until the run has saved at least one finished epoch while still in phase 1."""
    deadline = time.monotonic() + TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(
                f"the run ended (exit {process.returncode}) before it could be stopped:\n"
                + (log_dir / "stderr.txt").read_text()[-3000:]
            )
        state = read_state(output_dir)
        if state and state["history"]:
            assert 1 not in state["finished_phases"], "phase 1 ended before the run could be stopped in it"
            return
        time.sleep(POLL_SECONDS)
    pytest.fail(f"no epoch finished within {TIMEOUT_SECONDS} s")


def file_names(folder):
    """The names of everything in a folder, hidden entries included, sorted."""
    return sorted(path.name for path in folder.iterdir())


def test_run_killed_in_phase_one_resumes_after_its_last_finished_epoch(small_dataset, tmp_path, capsys):
    """After a SIGKILL in phase 1, --resume continues after the last saved epoch instead of starting over, and
    ends with an uninterrupted run's artifacts, each epoch once in the history, and no state or temporary files."""
    output_dir = tmp_path / "output"
    argv = training_argv(small_dataset, output_dir, KILLED_RUN)
    with training_process(argv, tmp_path) as process:
        wait_for_first_finished_epoch(process, output_dir, tmp_path)
        process.kill()
        assert process.wait(timeout=TIMEOUT_SECONDS) == -signal.SIGKILL

    exit_code = script.main([*argv, "--resume"])
    output = capsys.readouterr().out
    assert exit_code == 0
    resumed = re.search(r"resuming phase 1 after epoch (\d+)", output)
    assert resumed and int(resumed.group(1)) >= 1, output
    # Before training, the run says where it goes on: the epoch after the last finished one, counted from 1.
    assert f"resuming at fold 1, phase 1, epoch {int(resumed.group(1)) + 1}\n" in output
    assert output.index("resuming at fold 1") < output.index("resuming phase 1 after epoch")
    assert file_names(output_dir) == sorted(script.RUN_OUTPUT_FILES)  # Every output of a whole run, nothing else.
    history = pd.read_csv(output_dir / "history.csv")
    assert history["epoch"].tolist() == [1, 2, 3, 4, 5]  # Counted from 1, as the log and the plots count.
    assert history["phase"].tolist() == [1, 1, 1, 1, 2]
    assert not (output_dir / ".resume").exists()
    assert not list(output_dir.rglob(".partial-*"))


@pytest.fixture(scope="module")
def run_stopped_by_ctrl_c(small_dataset, tmp_path_factory):
    """A training process sent SIGINT after its first finished epoch. Tests must not change its output folder."""
    log_dir = tmp_path_factory.mktemp("ctrl_c")
    output_dir = log_dir / "output"
    with training_process(training_argv(small_dataset, output_dir, STOPPED_RUN), log_dir) as process:
        wait_for_first_finished_epoch(process, output_dir, log_dir)
        process.send_signal(signal.SIGINT)
        exit_code = process.wait(timeout=TIMEOUT_SECONDS)
    return StoppedRun(small_dataset, output_dir, exit_code, (log_dir / "stderr.txt").read_text())


def test_ctrl_c_exits_130_with_its_state_saved_and_says_how_to_resume(run_stopped_by_ctrl_c):
    """Ctrl-C stops training at a batch end with exit code 130, keeps the saved state, and prints the command
    that continues it."""
    assert run_stopped_by_ctrl_c.exit_code == 130, run_stopped_by_ctrl_c.stderr[-3000:]
    argv = training_argv(run_stopped_by_ctrl_c.data_dir, run_stopped_by_ctrl_c.output_dir, STOPPED_RUN)
    assert f"python script.py {shlex.join([*argv, '--resume'])}" in run_stopped_by_ctrl_c.stderr
    assert read_state(run_stopped_by_ctrl_c.output_dir)["history"]
    assert not (run_stopped_by_ctrl_c.output_dir / "submission.csv").exists()


def test_run_stopped_by_ctrl_c_resumes_to_the_end(run_stopped_by_ctrl_c, tmp_path, capsys):
    """--resume finishes a run that Ctrl-C stopped, continuing in phase 1."""
    # Hard links copy the state instantly and leave the fixture's intact: every write replaces a file by a
    # rename instead of changing it in place.
    output_dir = shutil.copytree(run_stopped_by_ctrl_c.output_dir, tmp_path / "output", copy_function=os.link)
    exit_code = script.main([*training_argv(run_stopped_by_ctrl_c.data_dir, output_dir, STOPPED_RUN), "--resume"])
    assert exit_code == 0
    output = capsys.readouterr().out
    assert "resuming phase 1 after epoch" in output and "resuming at fold 1, phase 1, epoch " in output
    assert (output_dir / "submission.csv").is_file()
    assert not (output_dir / ".resume").exists()


def test_resume_with_other_options_is_refused_naming_them(run_stopped_by_ctrl_c, capsys):
    """--resume refuses to continue with a training option the interrupted run did not use, and keeps its state."""
    output_dir = run_stopped_by_ctrl_c.output_dir
    argv = training_argv(run_stopped_by_ctrl_c.data_dir, output_dir, STOPPED_RUN)
    exit_code = script.main([*argv, "--seed", "7", "--resume"])
    assert exit_code == 2
    assert f"--seed was {script.SEED}, now 7" in capsys.readouterr().err
    assert read_state(output_dir)["history"]


def test_resume_position_names_fold_phase_and_epoch(tmp_path):
    """The line --resume prints before training: the first unfinished fold, its phase, and the next epoch."""
    _, options = script.parse_arguments(["--epochs", "3", "--fine-tune-epochs", "2", "--folds", "3"])
    settings = script.severity_settings(options)
    assert script.resume_position(tmp_path, settings, 3) == "fold 1, phase 1, epoch 1"
    done = script.Progress.load(tmp_path / "fold1")
    done.done = True
    done.save()
    in_phase_two = script.Progress.load(tmp_path / "fold2")
    in_phase_two.finished_phases = [1]
    in_phase_two.save()
    assert script.resume_position(tmp_path, settings, 3) == "fold 2, phase 2, epoch 4"
    in_phase_two.backup_epoch = 4
    in_phase_two.save()
    assert script.resume_position(tmp_path, settings, 3) == "fold 2, phase 2, epoch 5"


def test_the_mean_of_the_last_epochs_weights_is_kept_across_a_kill_and_resume(tmp_path):
    """From epoch average_from on, each epoch's weights join a running mean saved beside the state; a run killed after
    an epoch and resumed from state.json goes on from the mean it recorded, and superseded means are removed."""
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    state = script.Progress.load(tmp_path / "localiser")
    for epoch, value in enumerate([1.0, 2.0, 3.0, 7.0]):
        if epoch == 2:  # Killed after epoch 2: a new process reads the saved state.
            state = script.Progress.load(tmp_path / "localiser")
        saver = script.SaveProgress(1, 4, state, average_from=2)
        saver.set_model(model)
        model.set_weights([np.full(weights.shape, value, weights.dtype) for weights in model.get_weights()])
        saver.on_epoch_end(epoch, {"loss": 1.0})
    assert state.averaged_epochs == 3 and state.averaged_file == "averaged-epoch4.npz"
    mean = script.saved_weights(state.path(state.averaged_file))
    assert all(np.allclose(weights, (2.0 + 3.0 + 7.0) / 3) for weights in mean)
    assert sorted(path.name for path in state.fold_dir.glob("averaged-*")) == ["averaged-epoch4.npz"]


@pytest.mark.parametrize(
    "change, expected",
    [
        pytest.param(["--fine-tune-layers", "3"], "--fine-tune-layers was 10, now 3", id="fine-tune layers"),
        pytest.param("zoom_range", "AUGMENTATION was", id="augmentation"),
    ],
)
def test_resume_with_other_model_settings_is_refused_naming_them(
    run_stopped_by_ctrl_c, change, expected, monkeypatch, capsys
):
    """The model's settings, those without an option (AUGMENTATION) included, must match to resume."""
    output_dir = run_stopped_by_ctrl_c.output_dir
    argv = training_argv(run_stopped_by_ctrl_c.data_dir, output_dir, STOPPED_RUN)
    if change == "zoom_range":
        monkeypatch.setitem(script.AUGMENTATION, "zoom_range", 0.5)
        change = []
    exit_code = script.main([*argv, *change, "--resume"])
    assert exit_code == 2
    assert expected in capsys.readouterr().err
    assert read_state(output_dir)["history"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path):
    """A writer that fails half-way through leaves the previous file whole and its temporary file removed."""
    path = tmp_path / "submission.csv"
    path.write_text("old contents\n")
    temporary_paths = []

    def write_half_then_fail(temporary):
        temporary_paths.append(temporary)
        temporary.write_text("new cont")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        script.write_atomically(path, write_half_then_fail)
    assert path.read_text() == "old contents\n"
    assert temporary_paths[0].parent == tmp_path and temporary_paths[0].name.startswith(".partial-")
    assert file_names(tmp_path) == ["submission.csv"]


def test_csv_and_json_writers_replace_their_file_and_leave_no_temporary_file(tmp_path):
    """write_csv and write_json replace an existing file with the new contents, through a removed temporary."""
    for value in (1, 2):
        script.write_csv(pd.DataFrame({"row_id": ["a"], "value": [value]}), tmp_path / "table.csv")
        script.write_json({"value": value}, tmp_path / "metrics.json")
    assert pd.read_csv(tmp_path / "table.csv")["value"].tolist() == [2]
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"value": 2}
    assert file_names(tmp_path) == ["metrics.json", "table.csv"]


def refused_training(data_dir, output_dir, capsys, *extra_options):
    """Run a short training that must be refused before it trains; return the error message."""
    exit_code = script.main([*training_argv(data_dir, output_dir, SHORT_RUN), *extra_options])
    message = capsys.readouterr().err
    assert exit_code == 2, message
    assert not (output_dir / "submission.csv").exists()
    return message


def test_output_dir_that_is_a_file_is_refused_naming_it(small_dataset, tmp_path, capsys):
    """An --output-dir that is a file is refused before training, and the file is left alone."""
    output_file = tmp_path / "output"
    output_file.write_text("not a folder\n")
    message = refused_training(small_dataset, output_file, capsys)
    assert str(output_file) in message and "is a file" in message
    assert output_file.read_text() == "not a folder\n"


def test_too_little_free_disk_is_refused_stating_the_estimate(small_dataset, tmp_path, monkeypatch, capsys):
    """With less free disk than the checkpoints need, the run stops before training, says how much it needs,
    and writes nothing."""
    one_megabyte = 10**6
    monkeypatch.setattr(
        script.shutil,
        "disk_usage",
        lambda path: types.SimpleNamespace(total=10**12, used=10**12 - one_megabyte, free=one_megabyte),
    )
    output_dir = tmp_path / "output"
    message = refused_training(small_dataset, output_dir, capsys)
    _, options = script.parse_arguments(training_argv(small_dataset, output_dir, SHORT_RUN))
    assert f"{script.checkpoint_bytes(script.severity_settings(options), 1) / 1e9:.1f} GB" in message
    assert file_names(output_dir) == []


def first_image(data_dir, side):
    """The image of the first row on one side ("training" or "validation") of the run's split. Rows whose
    image is missing are left out first, as --skip-bad-images does."""
    with contextlib.redirect_stdout(io.StringIO()):  # The count of dropped rows is the run's to print, not ours.
        table = script.load_train_table(data_dir, skip_bad_images=True)
    training_rows, validation_rows = script.split_folds(table, 1, VALIDATION_FRACTION, script.SEED)[0]
    return table["image_path"][(training_rows if side == "training" else validation_rows)[0]]


def break_after_the_check(monkeypatch, *images):
    """Cut images down to their PNG signature right after the up-front check has passed them, as if the files
    were damaged while the run was going."""
    check_images = script.check_images

    def check_then_break(*arguments, **keywords):
        usable = check_images(*arguments, **keywords)
        for image in images:
            with open(image, "r+b") as file:
                file.truncate(8)
        return usable

    monkeypatch.setattr(script, "check_images", check_then_break)


def test_image_that_breaks_mid_run_stops_the_run_naming_it(dataset, tmp_path, monkeypatch, capsys):
    """A training image that no longer decodes after the check stops the run with exit 2, naming the file and
    the ways on (--resume, --skip-bad-images), with no submission and the resumable state kept."""
    image = first_image(dataset, "training")
    break_after_the_check(monkeypatch, image)
    output_dir = tmp_path / "output"
    message = refused_training(dataset, output_dir, capsys)
    assert image in message and "--resume" in message and "--skip-bad-images" in message
    assert (output_dir / ".resume").is_dir()


def test_skip_bad_images_drops_a_missing_image_and_leaves_out_ones_that_break_mid_run(
    dataset, tmp_path, monkeypatch, capsys
):
    """With --skip-bad-images a missing image is dropped up front, and a training and a validation image that
    break mid-run are left out; each is counted and named, and the run finishes."""
    missing = script.load_train_table(dataset)["image_path"][0]
    os.remove(missing)
    breaking = [first_image(dataset, "training"), first_image(dataset, "validation")]
    break_after_the_check(monkeypatch, *breaking)
    output_dir = tmp_path / "output"
    exit_code = script.main([*training_argv(dataset, output_dir, SHORT_RUN), "--skip-bad-images"])
    captured = capsys.readouterr()
    assert exit_code == 0, captured.err
    assert "dropped 1 row(s)" in captured.out and missing in captured.out
    assert "left out 2 image(s)" in captured.out and all(image in captured.out for image in breaking)
    assert (output_dir / "submission.csv").is_file()


def test_missing_test_image_is_refused_even_with_skip_bad_images(dataset, tmp_path, capsys):
    """Test rows are never dropped, since a submission must cover them all: a missing test image is refused."""
    image = script.load_test_table(dataset)["image_path"][0]
    os.remove(image)
    message = refused_training(dataset, tmp_path / "output", capsys, "--skip-bad-images")
    assert image in message


@pytest.fixture
def truncated_model(tmp_path):
    """The first half of a saved model.keras, as an interrupted copy leaves it."""
    inputs = keras.Input((64, 64, 3))
    outputs = keras.layers.Dense(3, activation="softmax")(keras.layers.GlobalAveragePooling2D()(inputs))
    keras.Model(inputs, outputs).save(tmp_path / "model.keras")
    contents = (tmp_path / "model.keras").read_bytes()
    path = tmp_path / "truncated.keras"
    path.write_bytes(contents[: len(contents) // 2])
    return path


@pytest.fixture
def model_with_lambda_layer(tmp_path):
    """A valid .keras file whose Lambda layer holds Python code, which only an unsafe load would run."""
    inputs = keras.Input((64, 64, 3))
    features = keras.layers.GlobalAveragePooling2D()(keras.layers.Lambda(lambda images: images)(inputs))
    path = tmp_path / "lambda.keras"
    keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(features)).save(path)
    return path


def refused_prediction(model_path, data_dir, output_dir, capsys):
    """Run `predict` with a model it must refuse; return the error message, which must name the model file."""
    exit_code = script.main(
        ["predict", "--model", str(model_path), "--data-dir", str(data_dir), "--output-dir", str(output_dir)]
    )
    message = capsys.readouterr().err
    assert exit_code == 2, message
    assert str(model_path) in message
    assert not (output_dir / "submission.csv").exists()
    return message


def test_predict_refuses_a_truncated_model_file(truncated_model, tiny_dataset, tmp_path, capsys):
    """A model file cut short is refused with a message naming it, and no submission is written."""
    refused_prediction(truncated_model, tiny_dataset, tmp_path / "output", capsys)


def test_predict_refuses_a_model_with_code_in_it(model_with_lambda_layer, tiny_dataset, tmp_path, capsys):
    """A model with a Lambda layer is refused by the safe-mode load instead of having its code run."""
    message = refused_prediction(model_with_lambda_layer, tiny_dataset, tmp_path / "output", capsys)
    assert "lambda" in message.lower()


def test_a_batch_whose_every_image_breaks_teaches_nothing_and_does_not_crash(tmp_path):
    """With --skip-bad-images, a batch in which every image fails to decode keeps its shape: black images with
    sample weight 0, each counted as skipped (it used to reach np.stack([]) and end in a traceback)."""
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"truncated")
    batches = script.ImageBatches([str(broken)] * 3, 32, 4, labels=[0, 1, 2], skip_bad_images=True)
    images, one_hot, weights = batches[0]
    assert images.shape == (3, 32, 32, 3) and one_hot.shape == (3, len(script.CLASS_NAMES))
    assert (weights == 0).all()
    assert batches.skipped == {str(broken)}
