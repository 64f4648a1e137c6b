"""Training learns: a short run from random weights on pictures with a clear signal beats the best constant.

Every other test would pass on a model that learns nothing, so this one states what learning means here. On the
learning check's squares (tests/synthetic.py) a from-scratch run of a few epochs must classify held-out test
pictures well and score far below the best constant prediction. The failure it guards against: the frozen random
base's features putting the head's ReLUs out of action within an epoch, so that every prediction is the prior.
"""

import json

import numpy as np
import pandas as pd
import synthetic
from conftest import script

# The run and the bar it must clear; benchmarks/learning.py measures the same run and reports its figures.
LEARNING_RUN = [
    "--weights",
    "none",
    "--image-size",
    "32",
    "--epochs",
    "5",
    "--fine-tune-epochs",
    "0",
    "--batch-size",
    "16",
    "--class-weights",
    "1,1,1",
    "--seed",
    "0",
]
MINIMUM_ACCURACY = 0.8  # On the held-out test pictures and on the validation rows; chance is 1/3.
MINIMUM_MARGIN = 0.4  # How far the validation score must fall below the best constant's (about 1.0 here).


def test_training_from_scratch_learns_a_clear_signal(tmp_path):
    data_dir = synthetic.make_squares_dataset(tmp_path / "data", seed=0)
    output_dir = tmp_path / "run"
    assert script.main([*LEARNING_RUN, "--data-dir", str(data_dir), "--output-dir", str(output_dir)]) == 0

    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["accuracy"] >= MINIMUM_ACCURACY
    assert metrics["score"] <= metrics["best_constant_score"] - MINIMUM_MARGIN

    submission = pd.read_csv(output_dir / "submission.csv")
    truth = pd.read_csv(data_dir / "test_labels.csv")
    assert submission["row_id"].tolist() == truth["row_id"].tolist()
    predicted = submission[list(script.CLASS_NAMES)].to_numpy().argmax(axis=1)
    true = truth[list(script.CLASS_NAMES)].to_numpy().argmax(axis=1)
    assert np.mean(predicted == true) >= MINIMUM_ACCURACY
