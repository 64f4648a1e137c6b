"""End to end: train on generated data, then check the whole submission contract and the artifacts."""

import numpy as np
import pandas as pd

from conftest import script


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
