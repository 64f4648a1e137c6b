"""Shared fixtures: tiny generated datasets and one tiny training run that several tests inspect."""

import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))
sys.path.insert(0, str(REPOSITORY / "tests"))

import script  # noqa: E402
import synthetic  # noqa: E402

# The fastest run that still trains, validates and writes every artifact.
QUICK_RUN = ["--weights", "none", "--image-size", "32", "--epochs", "1", "--fine-tune-epochs", "0",
             "--batch-size", "16"]
# Small and fast, both phases: 64-px images, random weights, one epoch per phase.
TINY_RUN = ["--weights", "none", "--image-size", "64", "--epochs", "1", "--fine-tune-epochs", "1",
            "--batch-size", "16"]


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
