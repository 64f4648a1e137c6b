"""What an outside bad-input probe found (issue 13), each kept fixed: every reader refuses empty and header-only
files by name, odd paths are named for what they are, score handles oof.csv and extra rows, priors and
predictions are never exactly 0, and the logs hold no TensorFlow start-up lines."""

import contextlib
import io
import os
import shlex
import shutil
import subprocess
import sys
import warnings

import cv2
import dicom_synthetic
import numpy as np
import pandas as pd
import pytest
import synthetic
from conftest import QUICK_RUN, REPOSITORY, script

SUBMISSION_HEADER = "row_id,normal_mild,moderate,severe\n"
COORDINATE_HEADER = "study_id,series_id,instance_number,condition,level,x,y\n"


def run_script(*arguments, env=None, timeout=120):
    """script.py in a fresh process, as a user starts it, without the tests' TF_CPP_MIN_LOG_LEVEL."""
    environment = {name: value for name, value in os.environ.items() if name != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.run(
        [sys.executable, str(REPOSITORY / "script.py"), *arguments],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**environment, **(env or {})},
    )


# ================================================================================================ start-up lines

TENSORFLOW_START_UP = ("oneDNN", "cudart_stub", "absl::InitializeLog", "cuInit", "cpu_feature_guard")


def test_help_prints_no_tensorflow_start_up_lines():
    """`python script.py --help` in a fresh process prints the usage and nothing on stderr: TensorFlow's native
    start-up lines (twice, from its two libraries) used to come first."""
    completed = run_script("--help")
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.startswith("usage: script.py")
    assert not any(line in completed.stderr for line in TENSORFLOW_START_UP), completed.stderr
    assert completed.stderr == ""


def test_a_real_import_error_still_shows(tmp_path):
    """Silencing the start-up lines must not swallow a broken installation: its traceback reaches stderr."""
    (tmp_path / "keras.py").write_text('raise ImportError("this keras is broken on purpose")\n')
    completed = run_script("--help", env={"PYTHONPATH": str(tmp_path)})
    assert completed.returncode == 1
    assert "Traceback" in completed.stderr and "this keras is broken on purpose" in completed.stderr


def test_score_with_a_header_only_submission_exits_2_with_one_line(tmp_path):
    """As the probe ran it: a header-only submission used to end in a TypeError traceback (exit 1). Now one line
    names the file, exit 2, and no TensorFlow line is printed around it."""
    solution = tmp_path / "solution.csv"
    solution.write_text(SUBMISSION_HEADER + "1_spinal_canal_stenosis_l1_l2,1,0,0\n")
    submission = tmp_path / "submission.csv"
    submission.write_text(SUBMISSION_HEADER)
    completed = run_script("score", "--solution", str(solution), "--submission", str(submission))
    assert completed.returncode == 2
    assert completed.stderr.startswith(f"error: {submission}: has a header but no rows")
    assert completed.stderr.count("\n") == 1, completed.stderr
    assert completed.stdout == ""


# ===================================================================================== empty and header-only files


def seed_layout(root):
    """A tiny valid seed layout, for the readers of train.csv and test.csv."""
    synthetic.make_dataset(root, train_rows=6, test_rows=2, image_size=32, plain_row_ids=True, class_mix=(1, 1, 1))
    return root


READERS = {
    "train.csv": lambda path: script.load_train_table(path.parent),
    "test.csv": lambda path: script.load_test_table(path.parent),
    "solution.csv": script.read_solution,
    "submission.csv": script.read_submission,
    "train_label_coordinates.csv": script.read_coordinates,
    "wide train.csv": script.read_labels,
    "test_series_descriptions.csv": lambda path: script.read_split_rows(path.parent, "test", None),
}
HEADERS = {
    "train.csv": ",".join(script.TRAIN_COLUMNS) + "\n",
    "test.csv": ",".join(script.TEST_COLUMNS) + "\n",
    "solution.csv": SUBMISSION_HEADER,
    "submission.csv": SUBMISSION_HEADER,
    "train_label_coordinates.csv": COORDINATE_HEADER,
    "wide train.csv": ",".join(["study_id", *script.WIDE_LABEL_COLUMNS]) + "\n",
    "test_series_descriptions.csv": "study_id,series_id,series_description\n",
}


@pytest.mark.parametrize("contents", ["header only", "empty"])
@pytest.mark.parametrize("reader", READERS)
def test_every_reader_refuses_empty_and_header_only_files_by_name(reader, contents, tmp_path):
    """Each CSV the script reads, with a header and no rows or with no bytes at all, is an InputError that names
    the file, never a crash further on (the header-only submission was a TypeError in np.isfinite)."""
    root = seed_layout(tmp_path / "data") if reader in ("train.csv", "test.csv") else tmp_path
    path = root / reader.split()[-1]
    path.write_text(HEADERS[reader] if contents == "header only" else "")
    expected = "has a header but no rows" if contents == "header only" else "cannot be read as a UTF-8 CSV"
    with pytest.raises(script.InputError, match=expected) as error:
        READERS[reader](path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize(
    "path, expected",
    [
        pytest.param(os.devnull, "is not a regular file", id="/dev/null"),
        pytest.param("folder", "is a folder, not a file", id="folder"),
        pytest.param("nowhere.csv", "file not found", id="missing"),
    ],
)
def test_a_path_that_is_no_regular_file_is_named_for_what_it_is(path, expected, tmp_path):
    """`--submission /dev/null` used to say "file not found"; a folder and a missing file each get their own words."""
    (tmp_path / "folder").mkdir()
    path = tmp_path / path
    with pytest.raises(script.InputError, match=expected) as error:
        script.read_submission(path)
    assert str(path) in str(error.value)


def test_an_image_path_that_is_a_folder_is_reported_as_a_folder(tmp_path):
    """An image_path naming a folder said "missing", which sends the user looking for a file that is there."""
    root = seed_layout(tmp_path / "data")
    table = pd.read_csv(root / "test.csv", dtype=str, keep_default_na=False)
    table.loc[0, "image_path"] = "images"
    table.to_csv(root / "test.csv", index=False)
    with pytest.raises(script.InputError, match=r"images: is a folder, not an image\)") as error:
        script.load_test_table(root)
    assert table.loc[0, "row_id"] in str(error.value)


# ============================================================================================== score and oof.csv


@pytest.fixture
def scored_files(tmp_path):
    """A four-row solution and a submission predicting two of its rows plus one row the solution lacks."""
    row_ids = [f"{study}_spinal_canal_stenosis_l1_l2" for study in (1, 2, 3, 4)]
    solution = pd.DataFrame({"row_id": row_ids, "normal_mild": [1, 0, 1, 0], "moderate": [0, 1, 0, 0]})
    solution["severe"] = [0, 0, 0, 1]
    submission = pd.DataFrame(
        {"row_id": [row_ids[0], row_ids[1], "9_spinal_canal_stenosis_l1_l2"], "normal_mild": [0.5, 0.25, 0.3]}
    ).assign(moderate=[0.25, 0.5, 0.3], severe=[0.25, 0.25, 0.4])
    solution.to_csv(tmp_path / "solution.csv", index=False)
    submission.to_csv(tmp_path / "submission.csv", index=False)
    return tmp_path / "solution.csv", tmp_path / "submission.csv"


def test_score_names_the_missing_rows_and_points_to_only_submitted(scored_files):
    solution, submission = scored_files
    with pytest.raises(script.InputError, match="lacks 2 of the 4 labelled row_ids") as error:
        script.run_score(solution, submission)
    assert str(submission) in str(error.value) and "--only-submitted" in str(error.value)


def test_only_submitted_scores_the_rows_present_and_counts_the_rest(scored_files, capsys):
    """--only-submitted scores just the two predicted rows, and says how many solution rows were left out and how
    many submission rows the solution has no label for."""
    solution, submission = scored_files
    scores = script.run_score(solution, submission, only_submitted=True)
    printed = capsys.readouterr().out
    assert scores["spinal"] == pytest.approx(np.log(2))  # Both rows put 0.5 on their true class.
    assert "2 labelled row(s) of the solution left out" in printed
    assert "1 row(s) whose row_id has no label in the solution were not scored: 9_spinal" in printed


# ================================================================================== priors and predictions above 0


class CertainModel:
    """A stand-in for a Keras model whose softmax rounded two classes to exactly 0, as float32 does for large
    logits. It records the batch sizes it was given."""

    input_shape = (None, 32, 32, 3)

    def __init__(self):
        self.batch_sizes = []

    def predict(self, batches, verbose=0):
        sizes = [len(batches[index][0]) for index in range(len(batches))]
        self.batch_sizes += sizes
        return np.tile(np.array([[1.0, 0.0, 0.0]], np.float32), (sum(sizes), 1))


def test_predictions_are_never_exactly_0_and_every_batch_is_full(tmp_path):
    """Probabilities of exactly 0 become at least PREDICTION_FLOOR and still sum to 1; a short last batch is padded
    so that the predict function sees one shape (traced once), and the padding's predictions are dropped."""
    root = seed_layout(tmp_path / "data")
    images = script.load_test_table(root)["image_path"].tolist() * 3  # 6 images in batches of 4: 4 and 2.
    model = CertainModel()
    options = type("Options", (), {"batch_size": 4, "workers": 1})()
    probabilities, predicted = script.predict_probabilities(model, images, options)
    assert model.batch_sizes == [4, 4]
    assert probabilities.shape == (6, 3) and predicted.all()
    assert probabilities.min() >= script.PREDICTION_FLOOR * 0.999
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0)


def test_precise_batch_norm_traces_the_network_once_per_model():
    """The statistics pass takes any batch size, so a short last batch does not trace the network again."""
    inputs = script.keras.Input((4, 4, 3))
    features = script.layers.BatchNormalization()(script.layers.Flatten()(inputs))
    model = script.keras.Model(inputs, script.layers.Dense(3, activation="softmax")(features))
    batches = [(np.random.default_rng(size).normal(size=(size, 4, 4, 3)).astype(np.float32),) for size in (8, 8, 3)]
    script.recalibrate_batch_normalization(model, batches)
    script.recalibrate_batch_normalization(model, batches)
    assert script.statistics_pass(model).experimental_get_tracing_count() == 1


# ================================================================================= a run owns its outputs, --no-test

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


def test_the_competition_folder_without_test_studies_names_the_file_and_no_test(tmp_path, capsys):
    """The missing test_series_descriptions.csv used to surface as OUT/prepared/test.csv "not found", a file the
    tool makes itself. Now the competition's file is named, with the way to train without a test set."""
    competition = tmp_path / "competition"
    competition.mkdir()
    (competition / "train_series_descriptions.csv").write_text("study_id,series_id,series_description\n1,2,T1\n")
    output_dir = tmp_path / "output"
    assert script.main(["--data-dir", str(competition), "--output-dir", str(output_dir)]) == 2
    message = capsys.readouterr().err
    assert f"{competition / 'test_series_descriptions.csv'}: file not found" in message and "--no-test" in message
    assert not output_dir.exists()


@pytest.mark.parametrize(
    "model, expected",
    [
        pytest.param("folder", "is a folder, not a model file", id="folder"),
        pytest.param("random.zip", "a zip archive, but not a Keras model file", id="random zip"),
    ],
)
def test_predict_names_a_model_folder_or_a_foreign_zip_in_one_line(model, expected, tiny_dataset, tmp_path, capsys):
    """--model DIR without a run's config.json said "file not found", and a zip that is no Keras model gave
    Keras' many-line TFSMLayer text; each now gets one line of its own."""
    (tmp_path / "folder").mkdir()
    with script.zipfile.ZipFile(tmp_path / "random.zip", "w") as archive:
        archive.writestr("readme.txt", "not a model")
    output_dir = tmp_path / "output"
    argv = [
        "predict",
        "--model",
        str(tmp_path / model),
        "--data-dir",
        str(tiny_dataset),
        "--output-dir",
        str(output_dir),
    ]
    assert script.main(argv) == 2
    message = capsys.readouterr().err
    assert message.startswith(f"error: --model {tmp_path / model}: {expected}") and message.count("\n") == 1
    assert not output_dir.exists()


# ============================================================================================ resuming, the plots


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


# ============================================================================================ the README's commands


def readme_commands(start):
    """The README's example command lines that begin with `start`."""
    lines = (REPOSITORY / "README.md").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip().startswith(start)]


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


# ======================================================================================== prepare: points and files

# pydicom warns about the synthetic competition's deliberately truncated files; prepare reports them instead.
prepare_warnings = pytest.mark.filterwarnings("ignore:End of file reached:UserWarning")
CROP_OPTIONS = {"crop_mm": 12.0, "crop_pixels": 32, "workers": 2}


def jpeg_ls_without_decoder(path):
    """Rewrite a DICOM file as JPEG-LS, which no installed plugin decodes here (pylibjpeg-libjpeg, gdcm and
    pyjpegls are not requirements); the pixel data is never reached, so it can be any JPEG-shaped bytes."""
    import pydicom
    from pydicom.encaps import encapsulate

    dataset = pydicom.dcmread(path)
    dataset.file_meta.TransferSyntaxUID = pydicom.uid.JPEGLSLossless
    dataset.PixelData = encapsulate([b"\xff\xd8 not really JPEG-LS \xff\xd9"])
    dataset.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def probed_competition(tmp_path_factory):
    """The synthetic competition with the probe's damage: one point far outside its slice, one on an instance the
    series lacks, one series without PixelSpacing, and two files in JPEG-LS; prepared once.
    Returns (competition, summary, printed summary, prepare's own output, prepared train.csv)."""
    import pydicom

    competition = dicom_synthetic.write_synthetic_competition(tmp_path_factory.mktemp("probed"), test_studies=1)
    coordinates_path = competition.root / "train_label_coordinates.csv"
    coordinates = pd.read_csv(coordinates_path)
    coordinates["row_id"] = (
        coordinates["study_id"].astype(str)
        + "_"
        + script.snake_case(coordinates["condition"])
        + "_"
        + script.snake_case(coordinates["level"])
    )
    outside = coordinates.index[coordinates["row_id"] == "1000_spinal_canal_stenosis_l2_l3"][0]
    coordinates.loc[outside, ["x", "y"]] = (5000.0, -300.0)
    lacking = coordinates.index[coordinates["row_id"] == "1000_spinal_canal_stenosis_l4_l5"][0]
    coordinates.loc[lacking, "instance_number"] = 99
    coordinates.drop(columns="row_id").to_csv(coordinates_path, index=False)
    series = competition.root / "train_images" / "1001" / "10011"  # Sagittal T1 of the second study.
    for path in series.glob("*.dcm"):
        dataset = pydicom.dcmread(path)
        del dataset.PixelSpacing
        dataset.save_as(path, enforce_file_format=True)
    jpeg_ls = [competition.root / "train_images" / "1000" / "10002" / f"{number}.dcm" for number in (3, 5)]
    for path in jpeg_ls:
        jpeg_ls_without_decoder(path)
    out_dir = tmp_path_factory.mktemp("probed_prepared")
    capture = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(capture):
        warnings.simplefilter("ignore", UserWarning)
        summary = script.prepare_competition(competition.root, out_dir, **CROP_OPTIONS)
        prepare_output = capture.getvalue()
        script.print_prepare_summary(summary)
    printed = capture.getvalue()[len(prepare_output) :]
    table = pd.read_csv(out_dir / "train.csv")
    return competition, summary, printed, prepare_output, table, {"series": series, "jpeg_ls": jpeg_ls}


def test_points_outside_their_slice_or_instance_are_skipped_and_named(probed_competition):
    """x=5000, y=-300 gave an all-black crop that was trained on; now it is skipped and named by row_id, like a
    point on an instance the series lacks."""
    _, summary, printed, _, table, _ = probed_competition
    assert summary["outside_image_row_ids"] == ["1000_spinal_canal_stenosis_l2_l3"]
    # The synthetic competition's own deleted instance file loses two more rows.
    assert "1000_spinal_canal_stenosis_l4_l5" in summary["missing_instance_row_ids"]
    assert not {"1000_spinal_canal_stenosis_l2_l3", "1000_spinal_canal_stenosis_l4_l5"} & set(table["row_id"])
    assert "1 whose point is outside its slice" in printed
    assert "Points outside their slice (or crops mostly past it): 1000_spinal_canal_stenosis_l2_l3." in printed
    assert "Points on an instance their series lacks: " in printed and "1000_spinal_canal_stenosis_l4_l5" in printed


def test_the_share_of_a_crop_on_its_slice():
    """The geometry behind the rule: a crop on the middle lies wholly on its slice, one centred on a corner keeps a
    quarter, one around a point far outside keeps nothing; below MINIMUM_CROP_INSIDE (a half) it is skipped."""
    assert script.crop_inside_share((100, 100), 50, 50, 1.0, 1.0, 20.0) == 1.0
    assert script.crop_inside_share((100, 100), -0.5, -0.5, 1.0, 1.0, 20.0) == pytest.approx(0.25)
    assert script.crop_inside_share((100, 100), 5000, -300, 1.0, 1.0, 20.0) == 0.0


def test_series_without_pixel_spacing_are_named_in_the_summary(probed_competition):
    """A missing PixelSpacing means 1 mm per pixel, as before, but no longer silently: the series is named."""
    _, summary, printed, _, _, damaged = probed_competition
    assert summary["series_without_spacing"] == [str(damaged["series"])]
    assert f"Series without PixelSpacing, cropped at 1 mm per pixel: 1: {damaged['series']}." in printed


def test_undecodable_files_are_grouped_by_cause_with_the_install_hint(probed_competition):
    """The JPEG-LS files without a decoder get one line together, with a count, their paths and what to install,
    instead of pydicom's four lines per file; the truncated files get a line of their own."""
    competition, _, printed, _, _, damaged = probed_competition
    lines = [line for line in printed.splitlines() if line.startswith("Undecodable DICOM files")]
    jpeg_ls = [line for line in lines if "JPEG-LS" in line]
    assert len(jpeg_ls) == 1 and jpeg_ls[0].startswith("Undecodable DICOM files: 2 with no decoder installed for")
    assert all(str(path) in jpeg_ls[0] for path in damaged["jpeg_ls"]) and "pip install" in jpeg_ls[0]
    truncated = [line for line in lines if "JPEG-LS" not in line]
    assert truncated and all(any(str(path) in line for line in truncated) for path in competition.corrupt_paths)
    assert "\t" not in printed and printed.count("requires") == 0


def test_prepare_prints_plain_progress_lines_into_a_log(probed_competition):
    """Redirected, prepare's progress is a few plain lines, without the progress bar's carriage returns or colours."""
    _, summary, _, prepare_output, _, _ = probed_competition
    assert "\r" not in prepare_output and "\x1b" not in prepare_output
    lines = prepare_output.splitlines()
    assert lines and all(line.startswith("crops: ") for line in lines) and len(lines) <= 10
    assert lines[-1].endswith("(100%)")


@pytest.mark.parametrize("row", [0, 1])
def test_a_blank_coordinate_is_refused_naming_the_line(row, tmp_path):
    """A blank x (or instance_number) read as NaN and crashed the instance lookup; now the line is named."""
    path = tmp_path / "coordinates.csv"
    cells = [["7", "70", "3", "Spinal Canal Stenosis", "L1/L2", "10.5", "20.5"]] * 2
    cells[row] = [*cells[row][:5], "", "20.5"] if row == 0 else [*cells[row][:2], "", *cells[row][3:]]
    path.write_text(COORDINATE_HEADER + "".join(",".join(line) + "\n" for line in cells))
    with pytest.raises(script.InputError, match=f"finite numbers; blank or infinite on line.s. {row + 2}"):
        script.read_coordinates(path)


TRANSFER_SYNTAXES = (
    "ExplicitVRLittleEndian",
    "ImplicitVRLittleEndian",
    "DeflatedExplicitVRLittleEndian",
    "ExplicitVRBigEndian",
    "RLELossless",
    "JPEG2000Lossless",
)


def write_series(series_dir, transfer_syntax, displayed):
    """One three-slice series of the same pictures, stored in the given transfer syntax."""
    import pydicom

    uid = getattr(pydicom.uid, transfer_syntax)
    kind = dicom_synthetic.SeriesKind(
        "Axial T2", (), "MONOCHROME2", (0.4, 0.5), (64, 48), pydicom.uid.ExplicitVRLittleEndian
    )
    for instance_number, pixels in enumerate(displayed, start=1):
        path = series_dir / f"{instance_number}.dcm"
        dicom_synthetic.write_dicom(path, kind, 1, 10, instance_number, pixels)
        if uid == pydicom.uid.ExplicitVRLittleEndian:
            continue
        dataset = pydicom.dcmread(path)
        if uid.is_compressed:
            dataset.compress(uid)
        elif not uid.is_little_endian:  # pydicom leaves the pixel bytes to the writer: swap them by hand.
            dataset.PixelData = dataset.pixel_array.astype(">u2").tobytes()
            dataset.file_meta.TransferSyntaxUID = uid
            pydicom.dcmwrite(path, dataset, little_endian=False, implicit_vr=False, force_encoding=True)
            continue
        else:
            dataset.file_meta.TransferSyntaxUID = uid
        dataset.save_as(path, enforce_file_format=True)
        assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == uid


def test_every_lossless_encoding_gives_the_same_crop(tmp_path):
    """The same slices stored uncompressed (explicit, implicit, big endian, deflated), RLE or JPEG 2000 lossless
    decode to byte-identical crops."""
    pytest.importorskip("openjpeg", reason="JPEG 2000 needs pylibjpeg-openjpeg (in the requirements)")
    generator = np.random.default_rng(0)
    kind = dicom_synthetic.SeriesKind("Axial T2", (), "MONOCHROME2", (0.4, 0.5), (64, 48), None)
    displayed = [dicom_synthetic.displayed_slice(kind, number, [(20.0, 30.0)], generator) for number in (1, 2, 3)]
    crops = {}
    for transfer_syntax in TRANSFER_SYNTAXES:
        series_dir = tmp_path / transfer_syntax
        write_series(series_dir, transfer_syntax, displayed)
        output = tmp_path / f"{transfer_syntax}.png"
        task = script.SeriesTask(series_dir, (script.Crop("row", 2, 20.0, 30.0, output),))
        result = script.crop_series(task, crop_mm=12.0, crop_pixels=32)
        assert result.written == ["row"] and not result.undecodable_files, (transfer_syntax, result)
        crops[transfer_syntax] = output.read_bytes()
    assert len(set(crops.values())) == 1, [name for name in crops if crops[name] != crops[TRANSFER_SYNTAXES[0]]]


# ================================================================================================ odd but valid data


def test_comma_space_separated_tables_find_their_images(tmp_path):
    """A CSV written with ", " between cells: the headers were accepted but every image_path kept its leading space,
    so every image went "missing". Spaces around paths are dropped; row_ids stay exactly as written."""
    root = seed_layout(tmp_path / "data")
    for name in ("train.csv", "test.csv"):
        lines = (root / name).read_text().splitlines()
        (root / name).write_text("".join(", ".join(line.split(",")) + "\n" for line in lines))
    train, test = script.load_train_table(root), script.load_test_table(root)
    expected = pd.read_csv(root / "train.csv", dtype=str, skipinitialspace=True)
    assert train["row_id"].tolist() == expected["row_id"].tolist()
    assert all(os.path.isfile(path) for path in [*train["image_path"], *test["image_path"]])


class StopBeforeTraining(Exception):
    """Raised by the stand-in for training: the run got past every check."""


def stop_before_training(*arguments):
    raise StopBeforeTraining


def test_test_row_ids_that_are_also_training_rows_get_a_one_line_warning(tmp_path, monkeypatch, capsys):
    root = seed_layout(tmp_path / "data")
    train = pd.read_csv(root / "train.csv", dtype=str)
    test = pd.read_csv(root / "test.csv", dtype=str)
    test.loc[0, "row_id"] = train.loc[2, "row_id"]
    test.to_csv(root / "test.csv", index=False)
    monkeypatch.setattr(script, "train_fold", stop_before_training)
    with pytest.raises(StopBeforeTraining):
        script.main(["--weights", "none", "--data-dir", str(root), "--output-dir", str(tmp_path / "output")])
    warning = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "1 test.csv row_id(s) also appear in train.csv" in warning[0]
    assert train.loc[2, "row_id"] in warning[0]


@prepare_warnings
def test_a_rerun_with_other_settings_or_points_cuts_those_crops_again(tmp_path, capsys):
    """prepare keeps crops already written, so a rerun used to keep 12 mm crops beside new 20 mm ones, or a crop of
    a point since corrected. Now only crops cut from the very same file, point and settings are kept."""
    competition = dicom_synthetic.write_synthetic_competition(tmp_path / "competition", test_studies=1)
    out_dir = tmp_path / "prepared"
    first = script.prepare_competition(competition.root, out_dir, **CROP_OPTIONS)
    assert first["images_written"] > 0 and "came from other points" not in capsys.readouterr().out
    larger = script.prepare_competition(competition.root, out_dir, **{**CROP_OPTIONS, "crop_pixels": 16})
    assert (larger["images_written"], larger["images_kept"]) == (first["images_written"], 0)
    assert "came from other points" in capsys.readouterr().out
    crops = sorted((out_dir / "images" / "train").glob("*.png"))
    assert {cv2.imread(str(path)).shape for path in crops} == {(16, 16, 3)}
    coordinates_path = competition.root / "train_label_coordinates.csv"
    coordinates = pd.read_csv(coordinates_path)
    coordinates.loc[len(coordinates) - 1, "x"] += 1.0  # One point corrected by a pixel.
    coordinates.to_csv(coordinates_path, index=False)
    corrected = script.prepare_competition(competition.root, out_dir, **{**CROP_OPTIONS, "crop_pixels": 16})
    assert (corrected["images_written"], corrected["images_kept"]) == (1, first["images_written"] - 1)


def test_only_the_false_retracing_alarm_about_fresh_keras_functions_is_dropped():
    """TensorFlow's retracing note about Keras' per-compile multi_step_on_iterator functions (each traced once)
    is dropped from its logger; the same note about any other function still shows."""
    import logging

    def note(function_name):
        message = f"5 out of the last 9 calls to <function {function_name} at 0x1> triggered tf.function retracing."
        return logging.LogRecord("tensorflow", logging.WARNING, __file__, 1, message, None, None)

    logger = script.tf.get_logger()
    assert sum(getattr(known, "__name__", "") == "keep_tensorflow_record" for known in logger.filters) == 1
    assert not logger.filter(note("TensorFlowTrainer._make_function.<locals>.multi_step_on_iterator"))
    assert logger.filter(note("recalibrate_batch_normalization.<locals>.statistics_pass"))


# =========================================================================================== more values refused


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--lr", "0"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--fine-tune-lr", "-1e-5"], "--fine-tune-lr"),
        (["--seed", "-1"], "--seed"),
        (["--class-weights", "1,2,inf"], "--class-weights"),
        (["--class-weights", "1,nan,4"], "--class-weights"),
        (["prepare", "--competition-dir", "c", "--out-dir", "o", "--crop-mm", "0"], "--crop-mm"),
    ],
)
def test_values_that_would_fail_mid_run_are_refused_at_parse_time(argv, named, monkeypatch, capsys):
    """A negative seed crashed NumPy after the outputs were cleared, a zero crop divided by zero, and a learning
    rate or class weight of 0, nan or inf trained garbage: argparse now refuses each, naming the option."""
    monkeypatch.setattr(script, "in_notebook", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        script.main(argv)
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err


@pytest.mark.parametrize(
    "line, expected",
    [
        ("7,70,3.5,Spinal Canal Stenosis,L1/L2,10.5,20.5", "instance_number must be a whole number"),
        ("7,,3,Spinal Canal Stenosis,L1/L2,10.5,20.5", "blank study_id or series_id on line"),
    ],
)
def test_coordinates_with_a_fractional_instance_or_a_blank_series_are_refused(line, expected, tmp_path):
    path = tmp_path / "coordinates.csv"
    path.write_text(COORDINATE_HEADER + line + "\n")
    with pytest.raises(script.InputError, match=expected) as error:
        script.read_coordinates(path)
    assert str(path) in str(error.value) and "2" in str(error.value)


def test_a_wide_train_csv_with_a_repeated_study_is_refused_by_name(tmp_path):
    """A repeated study_id would surface as duplicate row_ids of the prepared train.csv, a file the tool wrote."""
    path = tmp_path / "train.csv"
    row = ",".join(["Normal/Mild"] * len(script.WIDE_LABEL_COLUMNS))
    path.write_text(HEADERS["wide train.csv"] + f"7,{row}\n8,{row}\n7,{row}\n")
    with pytest.raises(script.InputError, match=f"{path}: each study_id must be given once.*: 7"):
        script.read_labels(path)


def test_weights_that_are_no_hdf5_file_are_refused_before_anything_is_written(tmp_path, capsys):
    root = seed_layout(tmp_path / "data")
    weights = tmp_path / "weights.h5"
    weights.write_text("not weights\n")
    output_dir = tmp_path / "output"
    assert script.main(["--weights", str(weights), "--data-dir", str(root), "--output-dir", str(output_dir)]) == 2
    assert f"--weights {weights}: not an HDF5 weights file" in capsys.readouterr().err
    assert not output_dir.exists()


def test_predict_refuses_a_model_of_another_shape_and_a_damaged_config(tmp_path, capsys):
    """A valid .keras file of five classes, and a config.json without best_constants, are refused by name, before
    any output folder exists."""
    root = seed_layout(tmp_path / "data")
    inputs = script.keras.Input((32, 32, 3))
    five_classes = script.keras.Model(inputs, script.layers.Dense(5)(script.layers.Flatten()(inputs)))
    five_classes.save(tmp_path / "five.keras")
    output_dir = tmp_path / "output"
    predict = ["predict", "--data-dir", str(root), "--output-dir", str(output_dir), "--model"]
    assert script.main([*predict, str(tmp_path / "five.keras")]) == 2
    assert "a severity model maps RGB images" in capsys.readouterr().err
    test = pd.read_csv(root / "test.csv", dtype=str, keep_default_na=False)
    test.loc[0, "image_path"] = ""
    test.to_csv(root / "test.csv", index=False)
    (tmp_path / "config.json").write_text("{}")
    assert script.main([*predict, str(tmp_path / "five.keras")]) == 2
    assert f"{tmp_path / 'config.json'}: not a training run's config.json" in capsys.readouterr().err
    assert not output_dir.exists()


def test_every_readme_command_line_parses(monkeypatch):
    """Each complete command line the README shows (placeholders in [...] aside) is accepted by the parser, so
    the README cannot drift from the options."""
    monkeypatch.setattr(script, "in_notebook", lambda: False)
    commands = [command for command in readme_commands("python script.py") if "[" not in command]
    assert len(commands) >= 6
    for command in commands:
        words = shlex.split(command.split("  ")[0])  # A wide gap starts the table's explanation.
        script.parse_arguments(words[2:])
