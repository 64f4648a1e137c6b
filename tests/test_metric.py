"""The competition metric and the score command: hand-computed cases for each rule, an independent sklearn-based
re-implementation, input errors, a submission lacking rows (named, or scored on the rows present with
--only-submitted), and checks against the real labels when they are available."""

import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import script as M
from sklearn.metrics import log_loss

LOG_2 = math.log(2)


def labels_frame(severities):
    """Long one-hot labels from {row_id: class name, or None for a blank row}."""
    one_hot = [[np.nan] * 3 if name is None else np.eye(3)[M.CLASS_NAMES.index(name)] for name in severities.values()]
    return pd.DataFrame(one_hot, columns=list(M.CLASS_NAMES)).assign(row_id=list(severities))


def prior_predictions(labels, row_ids, class_weights=M.LABEL_WEIGHTS):
    """Each row's best constant prediction, learned from `labels`, as a submission frame."""
    constants = M.best_constants(labels, class_weights)
    return M.probabilities_frame(row_ids, M.constant_predictions(row_ids, constants))


def predictions_frame(probabilities):
    """Long predictions from {row_id: (normal_mild, moderate, severe)}."""
    return pd.DataFrame(list(probabilities.values()), columns=list(M.CLASS_NAMES)).assign(row_id=list(probabilities))


def write_csv(directory, name, frame):
    """Writes a frame to directory/name without its index and returns the path."""
    path = directory / name
    frame.to_csv(path, index=False)
    return path


# ----------------------------------------------------------------------------------------------- helpers


def test_row_id_helpers():
    row_ids = pd.Series(
        [
            "12_spinal_canal_stenosis_l1_l2",
            "3_left_neural_foraminal_narrowing_l5_s1",
            "45_right_subarticular_stenosis_l2_l3",
            "7_something_else",
        ]
    )
    assert M.study_ids(row_ids).tolist() == ["12", "3", "45", "7"]
    assert M.locations(row_ids).tolist()[0] == "spinal_canal_stenosis_l1_l2"
    assert M.condition_groups(row_ids).tolist() == ["spinal", "foraminal", "subarticular", ""]


def test_list_some_names_twenty_then_counts_the_rest():
    assert M.list_some(["a", "b"]) == "a, b"
    message = M.list_some([f"id{index}" for index in range(25)])
    assert message.endswith("id19 and 5 more") and "id20" not in message


# ----------------------------------------------------------------------------------------------- rules


def test_probabilities_above_one_are_clipped_before_renormalising():
    scores = M.score_predictions(labels_frame({"a": "normal_mild"}), predictions_frame({"a": (2.0, 1.0, 0.0)}))
    # Clipping comes first, so (2, 1, 0) becomes (1 - 1e-15, 1 - 1e-15, 1e-15), which is nearly (1/2, 1/2, 0).
    assert scores["score"] == pytest.approx(LOG_2)


def test_zero_probability_is_clipped_to_1e_15():
    scores = M.score_predictions(labels_frame({"a": "moderate"}), predictions_frame({"a": (1.0, 0.0, 0.0)}))
    # The clipped row is (1 - 1e-15, 1e-15, 1e-15), which sums to 1 + 1e-15 before renormalising.
    assert scores["score"] == pytest.approx(-math.log(1e-15 / (1 + 1e-15)), rel=1e-12)


def test_certain_correct_prediction_costs_almost_nothing():
    scores = M.score_predictions(labels_frame({"a": "normal_mild"}), predictions_frame({"a": (1.0, 0.0, 0.0)}))
    assert 0 < scores["score"] < 1e-14


def test_rows_are_renormalised():
    scores = M.score_predictions(labels_frame({"a": "normal_mild"}), predictions_frame({"a": (0.4, 0.2, 0.2)}))
    assert scores["score"] == pytest.approx(LOG_2)


def test_rows_are_weighted_by_their_true_class():
    labels = labels_frame({"a": "normal_mild", "b": "severe"})
    predictions = predictions_frame({"a": (0.5, 0.25, 0.25), "b": (0.25, 0.5, 0.25)})
    # Losses log 2 (weight 1) and log 4 (weight 4): (log 2 + 4 * 2 log 2) / 5.
    assert M.score_predictions(labels, predictions)["score"] == pytest.approx(9 / 5 * LOG_2)


def spinal_example():
    """Two studies: study 1 has a severe level, study 2 only moderate and normal ones."""
    labels = labels_frame(
        {
            "1_spinal_canal_stenosis_l1_l2": "severe",
            "1_spinal_canal_stenosis_l2_l3": "normal_mild",
            "2_spinal_canal_stenosis_l1_l2": "moderate",
            "2_spinal_canal_stenosis_l2_l3": "normal_mild",
        }
    )
    predictions = predictions_frame(
        {
            "1_spinal_canal_stenosis_l1_l2": (0.25, 0.25, 0.5),
            "1_spinal_canal_stenosis_l2_l3": (0.6, 0.2, 0.2),
            "2_spinal_canal_stenosis_l1_l2": (0.4, 0.5, 0.1),
            "2_spinal_canal_stenosis_l2_l3": (0.5, 0.2, 0.3),
        }
    )
    return labels, predictions


def test_spinal_and_any_severe_spinal_by_hand():
    scores = M.score_predictions(*spinal_example())
    # Row losses and weights: log 2 x 4, -log 0.6 x 1, log 2 x 2, log 2 x 1.
    spinal = (7 * LOG_2 - math.log(0.6)) / 8
    # Study 1: severe, p = max(0.5, 0.2), weight 4. Study 2: not severe, p = max(0.1, 0.3), weight 2.
    any_severe = (4 * LOG_2 + 2 * -math.log(0.7)) / 6
    assert list(scores) == ["score", "spinal", "any_severe_spinal"]
    assert scores["spinal"] == pytest.approx(spinal, rel=1e-12)
    assert scores["any_severe_spinal"] == pytest.approx(any_severe, rel=1e-12)
    assert scores["score"] == pytest.approx((spinal + any_severe) / 2, rel=1e-12)


def test_any_severe_uses_the_renormalised_severe_probability():
    labels = labels_frame({"1_spinal_canal_stenosis_l1_l2": "severe"})
    predictions = predictions_frame({"1_spinal_canal_stenosis_l1_l2": (0.1, 0.1, 0.2)})
    assert M.score_predictions(labels, predictions)["any_severe_spinal"] == pytest.approx(LOG_2)


def test_score_is_the_mean_of_the_groups_present_and_any_severe():
    labels = labels_frame(
        {"1_spinal_canal_stenosis_l1_l2": "normal_mild", "1_left_neural_foraminal_narrowing_l1_l2": "moderate"}
    )
    predictions = predictions_frame(
        {"1_spinal_canal_stenosis_l1_l2": (0.5, 0.3, 0.2), "1_left_neural_foraminal_narrowing_l1_l2": (0.5, 0.25, 0.25)}
    )
    scores = M.score_predictions(labels, predictions)
    assert scores == pytest.approx(
        {
            "score": (LOG_2 + 2 * LOG_2 - math.log(0.8)) / 3,
            "spinal": LOG_2,
            "foraminal": 2 * LOG_2,
            "any_severe_spinal": -math.log(0.8),
        }
    )


def test_blank_labels_are_not_scored_and_need_no_prediction():
    labels, predictions = spinal_example()
    with_blanks = pd.concat(
        [labels, labels_frame({"3_spinal_canal_stenosis_l1_l2": None, "1_spinal_canal_stenosis_l3_l4": None})]
    )
    terrible = predictions_frame({"1_spinal_canal_stenosis_l3_l4": (1.0, 0.0, 0.0)})
    expected = M.score_predictions(labels, predictions)
    assert M.score_predictions(with_blanks, pd.concat([predictions, terrible])) == expected


def test_row_order_and_extra_submission_rows_do_not_matter():
    labels, predictions = random_example(seed=1)
    shuffled_labels = labels.sample(frac=1, random_state=2)
    extra = predictions_frame({"999_spinal_canal_stenosis_l1_l2": (1.0, 0.0, 0.0)})
    shuffled_predictions = pd.concat([predictions, extra]).sample(frac=1, random_state=3)
    assert M.score_predictions(shuffled_labels, shuffled_predictions) == pytest.approx(
        M.score_predictions(labels, predictions), rel=1e-12
    )


def test_a_missing_row_id_is_an_input_error_naming_it():
    labels, predictions = spinal_example()
    with pytest.raises(M.InputError, match="2_spinal_canal_stenosis_l2_l3"):
        M.score_predictions(labels, predictions.iloc[:3])


def test_many_missing_row_ids_are_summarised():
    labels, predictions = random_example(seed=4)
    labels = labels.dropna()
    predictions = predictions[~predictions["row_id"].isin(labels["row_id"].iloc[:30])]
    with pytest.raises(M.InputError, match=r"lacks 30 solution row_ids: .* and 10 more"):
        M.score_predictions(labels, predictions)


def test_row_ids_without_conditions_give_one_overall_score():
    labels = labels_frame({"a": "normal_mild", "b": "moderate"})
    predictions = predictions_frame({"a": (0.5, 0.25, 0.25), "b": (0.5, 0.25, 0.25)})
    assert M.score_predictions(labels, predictions) == pytest.approx({"score": (LOG_2 + 2 * 2 * LOG_2) / 3})


def test_mixing_row_ids_with_and_without_conditions_is_refused():
    labels = labels_frame({"1_spinal_canal_stenosis_l1_l2": "normal_mild", "odd_row": "moderate"})
    predictions = predictions_frame({"1_spinal_canal_stenosis_l1_l2": (1, 1, 1), "odd_row": (1, 1, 1)})
    with pytest.raises(M.InputError, match="odd_row"):
        M.score_predictions(labels, predictions)


# ----------------------------------------------------------------------------------------------- reference


def random_example(seed, studies=40):
    """Random labels (with a few blanks) and messy predictions (zeros, rows not summing to 1) for all 25 locations."""
    random = np.random.default_rng(seed)
    row_ids = [f"{1000 + study}_{column}" for study in range(studies) for column in M.WIDE_LABEL_COLUMNS]
    classes = random.choice(3, size=len(row_ids), p=[0.7, 0.2, 0.1])
    labels = pd.DataFrame(np.eye(3)[classes], columns=list(M.CLASS_NAMES)).assign(row_id=row_ids)
    labels.loc[random.random(len(row_ids)) < 0.05, list(M.CLASS_NAMES)] = np.nan
    probabilities = random.dirichlet([0.5, 0.5, 0.5], size=len(row_ids)) * random.uniform(0.5, 2, (len(row_ids), 1))
    probabilities[random.random(probabilities.shape) < 0.02] = 0.0
    return labels, pd.DataFrame(probabilities, columns=list(M.CLASS_NAMES)).assign(row_id=row_ids)


def reference_score(solution, submission):
    """The official Kaggle metric's structure with sklearn's log_loss, written independently of the metric part."""
    solution = solution.dropna(subset=list(M.CLASS_NAMES)).copy()
    probabilities = submission.set_index("row_id").loc[solution["row_id"], list(M.CLASS_NAMES)].to_numpy()
    probabilities = np.clip(probabilities, 1e-15, 1 - 1e-15)
    probabilities = probabilities / probabilities.sum(axis=1, keepdims=True)
    solution["true_class"] = solution[list(M.CLASS_NAMES)].to_numpy().argmax(axis=1)
    solution["sample_weight"] = 2.0 ** solution["true_class"]
    solution["study_id"] = [row_id.split("_")[0] for row_id in solution["row_id"]]
    solution["condition"] = [
        next(group for key, group in M.CONDITION_GROUPS.items() if key in row_id) for row_id in solution["row_id"]
    ]
    solution["predicted_severe"] = probabilities[:, 2]
    losses = {}
    for condition in ["spinal", "foraminal", "subarticular"]:
        mask = (solution["condition"] == condition).to_numpy()
        losses[condition] = log_loss(
            solution.loc[mask, "true_class"],
            probabilities[mask],
            sample_weight=solution.loc[mask, "sample_weight"],
            labels=[0, 1, 2],
        )
    studies = solution[solution["condition"] == "spinal"].groupby("study_id")
    losses["any_severe_spinal"] = log_loss(
        studies["severe"].max(),
        studies["predicted_severe"].max(),
        sample_weight=studies["sample_weight"].max(),
        labels=[0, 1],
    )
    return {"score": np.mean(list(losses.values())), **losses}


@pytest.mark.filterwarnings("ignore::FutureWarning")  # sklearn 1.9 renames log_loss's y_pred to y_proba.
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_an_independent_sklearn_reimplementation(seed):
    labels, predictions = random_example(seed)
    assert M.score_predictions(labels, predictions) == pytest.approx(
        reference_score(labels, predictions), rel=1e-9, abs=1e-9
    )


# ----------------------------------------------------------------------------------------------- labels


def test_labels_from_wide_makes_long_one_hot_rows():
    severities = {column: ["Normal/Mild", "Moderate"] for column in M.WIDE_LABEL_COLUMNS}
    wide = pd.DataFrame({"study_id": [7, 3], **severities})
    wide.loc[1, "spinal_canal_stenosis_l2_l3"] = "Severe"
    wide.loc[0, "right_subarticular_stenosis_l5_s1"] = np.nan
    labels = M.labels_from_wide(wide)
    assert len(labels) == 50 and list(labels.columns) == ["row_id", *M.CLASS_NAMES]
    assert labels["row_id"].iloc[[0, 24, 25, 26]].tolist() == [
        "7_spinal_canal_stenosis_l1_l2",
        "7_right_subarticular_stenosis_l5_s1",
        "3_spinal_canal_stenosis_l1_l2",
        "3_spinal_canal_stenosis_l2_l3",
    ]
    one_hot = labels[list(M.CLASS_NAMES)].to_numpy()
    np.testing.assert_array_equal(one_hot[[0, 25, 26]], [[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    assert np.isnan(one_hot[24]).all()


def test_unknown_severity_names_the_column_and_study():
    wide = pd.DataFrame({"study_id": ["7"], **{column: ["Normal/Mild"] for column in M.WIDE_LABEL_COLUMNS}})
    wide.loc[0, "left_subarticular_stenosis_l3_l4"] = "Mild"
    with pytest.raises(M.InputError, match=r"column left_subarticular_stenosis_l3_l4 has Mild for study_ids 7"):
        M.labels_from_wide(wide)


def test_wide_labels_missing_a_column_are_refused():
    wide = pd.DataFrame({"study_id": ["7"], "spinal_canal_stenosis_l1_l2": ["Severe"]})
    with pytest.raises(M.InputError, match="spinal_canal_stenosis_l2_l3"):
        M.labels_from_wide(wide)


def test_wide_and_long_solution_files_score_the_same(tmp_path):
    random = np.random.default_rng(5)
    severities = random.choice([*M.SEVERITY_NAMES, ""], size=(40, 25), p=[0.6, 0.2, 0.1, 0.1])
    wide = pd.DataFrame(severities, columns=list(M.WIDE_LABEL_COLUMNS)).assign(study_id=range(1000, 1040))
    class_of = {**dict(zip(M.SEVERITY_NAMES, M.CLASS_NAMES)), "": None}
    long = labels_frame(
        {
            f"{study}_{column}": class_of[wide.at[index, column]]
            for index, study in enumerate(wide["study_id"])
            for column in M.WIDE_LABEL_COLUMNS
        }
    )
    wide_path, long_path = write_csv(tmp_path, "train.csv", wide), write_csv(tmp_path, "solution.csv", long)
    pd.testing.assert_frame_equal(M.read_solution(wide_path), M.read_solution(long_path))
    submission_path = write_csv(tmp_path, "submission.csv", random_example(seed=5)[1])
    assert M.run_score(wide_path, submission_path) == M.run_score(long_path, submission_path)


def test_best_constant_is_frequencies_times_weights_renormalised():
    labels = labels_frame({"a": "normal_mild", "b": "normal_mild", "c": "moderate", "d": "severe", "e": None})
    # Counts (2, 1, 1), smoothed by half a row each to (2.5, 1.5, 1.5), times weights (1, 2, 4) are (2.5, 3, 6),
    # which renormalise to this.
    np.testing.assert_allclose(M.best_constant_prediction(labels), [2.5 / 11.5, 3 / 11.5, 6 / 11.5])
    np.testing.assert_allclose(
        M.best_constant_prediction(labels, class_weights=(1, 1, 1)), [2.5 / 5.5, 1.5 / 5.5, 1.5 / 5.5]
    )


def test_best_constant_of_a_location_missing_a_class_is_never_exactly_0_or_1():
    """A location whose few rows are all one class still gives the others a small probability (half a row each),
    so that one test row of a missing class costs a few units of log loss, not the clipped 34.5."""
    constant = M.best_constant_prediction(labels_frame({"a": "normal_mild", "b": "normal_mild"}))
    np.testing.assert_allclose(constant, np.array([2.5, 1.0, 2.0]) / 5.5)
    assert (constant > 0).all() and (constant < 1).all()
    cost = M.score_predictions(labels_frame({"a": "moderate"}), predictions_frame({"a": tuple(constant)}))["score"]
    assert cost < 2.0


def test_prior_predictions_use_each_locations_constant():
    labels = labels_frame(
        {
            "1_spinal_canal_stenosis_l1_l2": "normal_mild",
            "2_spinal_canal_stenosis_l1_l2": "severe",
            "1_spinal_canal_stenosis_l2_l3": "moderate",
        }
    )
    row_ids = pd.Series(["9_spinal_canal_stenosis_l2_l3", "9_spinal_canal_stenosis_l1_l2", "9_unseen_location"])
    predictions = prior_predictions(labels, row_ids)
    assert predictions["row_id"].tolist() == row_ids.tolist()
    # Each location's counts, smoothed by half a row of each class, times the weights (1, 2, 4).
    np.testing.assert_allclose(
        predictions[list(M.CLASS_NAMES)].to_numpy(),
        [np.array([0.5, 3, 2]) / 5.5, np.array([1.5, 1, 6]) / 8.5, M.best_constant_prediction(labels)],
    )


# ----------------------------------------------------------------------------------------------- files


@pytest.fixture
def example_files(tmp_path):
    """A long solution and a matching submission for the two-study spinal example, written as CSV files."""
    labels, predictions = spinal_example()
    return write_csv(tmp_path, "solution.csv", labels), write_csv(tmp_path, "submission.csv", predictions)


def test_run_score_prints_a_table_then_json_last(example_files, capsys):
    scores = M.run_score(*example_files)
    output = capsys.readouterr().out.strip().splitlines()
    assert "any_severe_spinal" in "\n".join(output[:-1])
    assert json.loads(output[-1]) == scores
    assert list(json.loads(output[-1])) == ["score", "spinal", "any_severe_spinal"]
    assert scores == M.score_predictions(*spinal_example())


def test_run_score_says_when_row_ids_name_no_condition(tmp_path, capsys):
    solution = write_csv(tmp_path, "solution.csv", labels_frame({"a": "severe"}))
    submission = write_csv(tmp_path, "submission.csv", predictions_frame({"a": (0.5, 0, 0.5)}))
    M.run_score(solution, submission)
    output = capsys.readouterr().out.strip().splitlines()
    assert "no condition" in output[0]
    assert json.loads(output[-1]) == pytest.approx({"score": LOG_2})


def test_files_tolerate_a_bom_padded_headers_and_na_like_row_ids(tmp_path):
    solution = tmp_path / "solution.csv"
    solution.write_text("\ufeff row_id , normal_mild,moderate , severe\nNA,0,1,0\nnull,,,\n", encoding="utf-8")
    submission = tmp_path / "submission.csv"
    submission.write_text("\ufeffrow_id,normal_mild,moderate,severe\nNA, 0.5 ,0.25,0.25\n", encoding="utf-8")
    assert M.run_score(solution, submission) == pytest.approx({"score": 2 * LOG_2})


def test_a_missing_file_is_an_input_error(example_files, tmp_path):
    with pytest.raises(M.InputError, match="nowhere.csv: file not found"):
        M.run_score(example_files[0], tmp_path / "nowhere.csv")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda frame: frame.drop(columns="moderate"), "submission.csv: missing column.s. moderate"),
        (
            lambda frame: frame.astype({"severe": object}).assign(severe=["0.1", "abc", "0.2", "0.3"]),
            "column severe needs finite.*1_spinal_canal_stenosis_l2_l3",
        ),
        (
            lambda frame: frame.assign(normal_mild=[0.1, 0.2, np.inf, 0.3]),
            "column normal_mild .* 2_spinal_canal_stenosis_l1_l2",
        ),
        (
            lambda frame: frame.assign(moderate=[0.1, 0.2, 0.3, -0.1]),
            "column moderate .* 2_spinal_canal_stenosis_l2_l3",
        ),
        (
            lambda frame: frame.assign(moderate=[0.1, 0.2, 0.3, None]),
            "column moderate .* 2_spinal_canal_stenosis_l2_l3",
        ),
        (lambda frame: pd.concat([frame, frame.iloc[[1]]]), "duplicate row_id.s. 1_spinal_canal_stenosis_l2_l3"),
    ],
)
def test_bad_submissions_are_input_errors_naming_the_problem(example_files, edit, message):
    solution_path, submission_path = example_files
    edit(pd.read_csv(submission_path)).to_csv(submission_path, index=False)
    with pytest.raises(M.InputError, match=message):
        M.run_score(solution_path, submission_path)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda frame: frame.assign(moderate=[0, 0.5, 1, 0]), "not one-hot .*1_spinal_canal_stenosis_l2_l3"),
        (lambda frame: frame.assign(severe=[1, None, 0, 0]), "one-hot .* 1_spinal_canal_stenosis_l2_l3"),
        (
            lambda frame: frame.astype({"severe": object}).assign(severe=["1", "yes", "0", "0"]),
            "not one-hot .*1_spinal_canal_stenosis_l2_l3",
        ),
        (lambda frame: frame.drop(columns="row_id"), "solution.csv: missing column.s. row_id"),
    ],
)
def test_bad_solutions_are_input_errors_naming_the_problem(example_files, edit, message):
    solution_path, submission_path = example_files
    edit(pd.read_csv(solution_path)).to_csv(solution_path, index=False)
    with pytest.raises(M.InputError, match=message):
        M.run_score(solution_path, submission_path)


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
    with pytest.raises(M.InputError, match="lacks 2 of the 4 labelled row_ids") as error:
        M.run_score(solution, submission)
    assert str(submission) in str(error.value) and "--only-submitted" in str(error.value)


def test_only_submitted_scores_the_rows_present_and_counts_the_rest(scored_files, capsys):
    """--only-submitted scores just the two predicted rows, and says how many solution rows were left out and how
    many submission rows the solution has no label for."""
    solution, submission = scored_files
    scores = M.run_score(solution, submission, only_submitted=True)
    printed = capsys.readouterr().out
    assert scores["spinal"] == pytest.approx(np.log(2))  # Both rows put 0.5 on their true class.
    assert "2 labelled row(s) of the solution left out" in printed
    assert "1 row(s) whose row_id has no label in the solution were not scored: 9_spinal" in printed


# ----------------------------------------------------------------------------------------------- real labels


@pytest.fixture(scope="module")
def real_labels_path():
    """The competition's real train.csv, from RSNA_REAL_DIR or the shared folder beside the repo; else skip."""
    real_dir = Path(os.environ.get("RSNA_REAL_DIR", Path(__file__).resolve().parents[2] / "shared/real/rsna2024"))
    if not (real_dir / "train.csv").is_file():
        pytest.skip(f"the real labels are not available in {real_dir}")
    return real_dir / "train.csv"


@pytest.fixture(scope="module")
def real_labels(real_labels_path):
    """The real labels as long one-hot rows."""
    return M.read_solution(real_labels_path)


def constant_predictions(row_ids, probabilities):
    """The same probabilities for every row_id."""
    return pd.DataFrame([probabilities] * len(row_ids), columns=list(M.CLASS_NAMES)).assign(row_id=row_ids.to_numpy())


def test_real_labels_with_the_uniform_prediction(real_labels):
    scores = M.score_predictions(real_labels, constant_predictions(real_labels["row_id"], [1 / 3] * 3))
    for group in ("spinal", "foraminal", "subarticular"):
        assert scores[group] == pytest.approx(math.log(3))
    # Each study's loss is log 3 when severe and log 1.5 otherwise, so the mean lies between them.
    assert math.log(1.5) < scores["any_severe_spinal"] < math.log(3)
    assert scores["score"] == pytest.approx((3 * math.log(3) + scores["any_severe_spinal"]) / 4)


def test_real_labels_with_per_location_priors(real_labels):
    frequencies = M.score_predictions(real_labels, prior_predictions(real_labels, real_labels["row_id"], (1, 1, 1)))
    best = M.score_predictions(real_labels, prior_predictions(real_labels, real_labels["row_id"]))
    assert all(0.3 < value < 1.3 for value in [*frequencies.values(), *best.values()])
    # The known figures for the real labels: about 0.93 for the plain frequencies, about 0.79 for the weighted
    # best constants.
    assert frequencies["score"] == pytest.approx(0.93, abs=0.005)
    assert best["score"] == pytest.approx(0.79, abs=0.005)


def test_real_wide_labels_equal_their_long_form(real_labels, real_labels_path, tmp_path):
    long_path = write_csv(tmp_path, "solution.csv", real_labels)
    submission_path = write_csv(tmp_path, "submission.csv", prior_predictions(real_labels, real_labels["row_id"]))
    pd.testing.assert_frame_equal(M.read_solution(long_path), real_labels)
    assert M.run_score(real_labels_path, submission_path) == M.run_score(long_path, submission_path)
