"""Shared fixtures and helpers: tiny generated datasets, random ResNet50 weights, one tiny training run and one
damaged competition prepared once, which several test files inspect; and the order the test files run in."""

import contextlib
import io
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))
sys.path.insert(0, str(REPOSITORY / "tests"))

import dicom_synthetic  # noqa: E402
import synthetic  # noqa: E402

import script  # noqa: E402

script.import_tensorflow()  # The tests call Keras code directly, not only through the commands that import it.

# Randomly initialised ResNet50 weights in a file. `--weights PATH` takes the pretrained path (the base frozen in
# phase 1), whose steps cost a fraction of a from-scratch step, for the many tests that need a run but not
# learning; tests of the from-scratch path (--weights none) use TINY_RUN or their own runs.
RANDOM_WEIGHTS = Path(tempfile.gettempdir()) / f"rsna-tests-{os.getpid()}-random-resnet50.weights.h5"
# The fastest run that still trains, validates and writes every artifact.
QUICK_RUN = [
    "--weights",
    str(RANDOM_WEIGHTS),
    *"--image-size 32 --epochs 1 --fine-tune-epochs 0 --batch-size 16 --localiser-epochs 0".split(),
]
# Small and fast, both phases, from scratch: 32-px inputs (from 64-px images), one epoch per phase.
TINY_RUN = ["--weights", "none", "--image-size", "32", "--epochs", "1", "--fine-tune-epochs", "1", "--batch-size", "16"]
SUBMISSION_HEADER = "row_id,normal_mild,moderate,severe\n"


def seed_layout(root):
    """A tiny valid seed layout (six training rows, two test rows, 32 px), for the readers of train.csv and
    test.csv and for runs that are refused or stopped before training."""
    synthetic.make_dataset(root, train_rows=6, test_rows=2, image_size=32, plain_row_ids=True, class_mix=(1, 1, 1))
    return root


def readme_commands(start):
    """The README's example command lines that begin with `start`."""
    lines = (REPOSITORY / "README.md").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip().startswith(start)]


def nearest_slice(stacks, point):
    """(stack, index, x, y, distance) of the slice nearest a world point along its normal, among those whose
    image holds the point's projection, across all the given stacks; None if there is none. The tests' reference
    for script's geometry (Stack's plane_distances, world_to_pixel and contains)."""
    best = None
    for stack in stacks:
        distances = stack.plane_distances(point)
        for index in np.argsort(np.abs(distances)):
            x, y, distance = stack.world_to_pixel(point, index)
            if stack.contains(x, y):
                if best is None or abs(distance) < abs(best[4]):
                    best = (stack, int(index), x, y, distance)
                break
    return best


@pytest.fixture(scope="session", autouse=True)
def random_weights():
    """Write RANDOM_WEIGHTS once per session (ResNet50's weights do not depend on the input size)."""
    script.keras.applications.ResNet50(include_top=False, weights=None, input_shape=(32, 32, 3)).save_weights(
        RANDOM_WEIGHTS
    )
    yield RANDOM_WEIGHTS
    RANDOM_WEIGHTS.unlink(missing_ok=True)


@pytest.fixture(scope="session", autouse=True)
def localiser_epochs_of_the_slices_there_are():
    """The suite's competitions are tiny: their localisers train on the slices they have each epoch, without the
    minimum per epoch (LOCALISER_MIN_SLICES_PER_EPOCH) that would quadruple their steps, so the suite stays fast."""
    minimum = script.LOCALISER_MIN_SLICES_PER_EPOCH
    script.LOCALISER_MIN_SLICES_PER_EPOCH = 0
    yield
    script.LOCALISER_MIN_SLICES_PER_EPOCH = minimum


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """Six training studies (150 rows) and one test study, 64 px."""
    root = tmp_path_factory.mktemp("tiny_dataset")
    synthetic.make_dataset(root, train_studies=6, test_studies=1, image_size=64, seed=1)
    return root


@pytest.fixture(scope="session")
def tiny_run(tiny_dataset, tmp_path_factory):
    """One tiny end-to-end training run; returns its output folder."""
    output_dir = tmp_path_factory.mktemp("tiny_run")
    exit_code = script.main([*TINY_RUN, "--data-dir", str(tiny_dataset), "--output-dir", str(output_dir)])
    assert exit_code == 0
    return output_dir


def jpeg_ls_without_decoder(path):
    """Rewrite a DICOM file as JPEG-LS, which no installed plugin decodes here (pylibjpeg-libjpeg, gdcm and
    pyjpegls are not requirements); the pixel data is never reached, so it can be any JPEG-shaped bytes."""
    import pydicom
    from pydicom.encaps import encapsulate

    dataset = pydicom.dcmread(path)
    dataset.file_meta.TransferSyntaxUID = pydicom.uid.JPEGLSLossless
    dataset.PixelData = encapsulate([b"\xff\xd8 not really JPEG-LS \xff\xd9"])
    dataset.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="session")
def damaged_competition(tmp_path_factory):
    """The synthetic competition damaged as real ones are: one point far outside its slice, one on an instance the
    series lacks, one series without PixelSpacing, and two files in JPEG-LS; prepared once (12 mm crops of 32 px).
    Returns (competition, summary, printed summary, prepare's own output, prepared train.csv, damaged paths)."""
    import pydicom

    competition = dicom_synthetic.write_synthetic_competition(tmp_path_factory.mktemp("damaged"), test_studies=1)
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
    out_dir = tmp_path_factory.mktemp("damaged_prepared")
    capture = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(capture):
        warnings.simplefilter("ignore", UserWarning)
        summary = script.prepare_competition(competition.root, out_dir, crop_mm=12.0, crop_pixels=32, workers=2)
        prepare_output = capture.getvalue()
        script.print_prepare_summary(summary)
    printed = capture.getvalue()[len(prepare_output) :]
    table = pd.read_csv(out_dir / "train.csv")
    return competition, summary, printed, prepare_output, table, {"series": series, "jpeg_ls": jpeg_ls}


# The suite runs on two workers, a test file to each at a time (pytest.ini); handing out the slowest files first
# keeps one worker from starting a long file while the other has finished everything else. Slowest first, by what
# each file cost on two cores (its module fixtures' training runs, and subprocesses that start TensorFlow).
SLOWEST_FILES_FIRST = (
    "test_localiser.py",
    "test_kaggle_notebooks.py",
    "test_faults.py",
    "test_pipeline.py",
    "test_distribute.py",
    "test_learning.py",
    "test_competition_flow.py",
    "test_notebook.py",
    "test_time_estimate.py",
    "test_small_data.py",
    "test_bad_input.py",
    "test_outputs.py",
    "test_kaggle.py",
    "test_logs.py",
    "test_anatomy_synthetic.py",
    "test_model.py",
    "test_refusals.py",
    "test_prepare.py",
)


def pytest_collection_modifyitems(items):
    """Order the tests by SLOWEST_FILES_FIRST, then as collected."""
    rank = {name: position for position, name in enumerate(SLOWEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
