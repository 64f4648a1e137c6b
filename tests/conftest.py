"""Shared fixtures: tiny generated datasets, random ResNet50 weights and one tiny training run that several tests
inspect."""

import os
import sys
import tempfile
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))
sys.path.insert(0, str(REPOSITORY / "tests"))

import synthetic  # noqa: E402

import script  # noqa: E402

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


# The suite runs on two workers, a test file to each at a time (pytest.ini); handing out the slowest files first
# keeps one worker from starting a long file while the other has finished everything else.
SLOWEST_FILES_FIRST = (
    "test_localiser.py",
    "test_kaggle_notebooks.py",
    "test_faults.py",
    "test_distribute.py",
    "test_learning.py",
    "test_probe.py",
    "test_pipeline.py",
    "test_competition_flow.py",
    "test_notebook.py",
)


def pytest_collection_modifyitems(items):
    """Order the tests by SLOWEST_FILES_FIRST, then as collected."""
    rank = {name: position for position, name in enumerate(SLOWEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
