"""Bad input is refused before any work: exit code 2, one message on stderr that names the file, column or
row_ids at fault, no traceback, and nothing written to the output folder. Among them: a competition folder without
test studies, weights that are no HDF5 file, and a --model that is a folder without a run, a foreign zip, a model
of another shape or a run whose config.json is damaged."""

import subprocess
import sys

import pandas as pd
import pytest
import synthetic
from conftest import REPOSITORY, script, seed_layout

# Refusals happen before training, so the command line can ask for the smallest model ResNet50 allows.
SMALL_RUN = ["--weights", "none", "--image-size", "32"]
BAD_ROW_COUNT = 25  # More than the 20 row_ids a message lists, so the "and N more" tail shows.


@pytest.fixture
def data_dir(tmp_path):
    """A fresh, valid dataset of five training studies (125 rows) and one test study, 32 px."""
    root = tmp_path / "data"
    synthetic.make_dataset(root, train_studies=5, test_studies=1, image_size=32, seed=3)
    return root


@pytest.fixture
def output_dir(tmp_path):
    """An output folder that does not exist yet, so any write at all would create it."""
    return tmp_path / "output"


def read_table(data_dir, name):
    """A dataset CSV as text, the way script.py reads it."""
    return pd.read_csv(data_dir / name, dtype=str, keep_default_na=False)


def write_table(data_dir, name, table):
    table.to_csv(data_dir / name, index=False)


def run_refused(argv, output_dir, capsys):
    """Run script.main, check the refusal contract every bad input shares, and return the message."""
    exit_code = script.main(argv)
    captured = capsys.readouterr()
    assert exit_code == 2
    message = captured.err.strip()
    assert message.startswith("error: ") and "\n" not in message, captured.err
    assert "Traceback" not in captured.err + captured.out
    assert not output_dir.exists(), "a refused run must not write anything"
    return message


def refuse_training(data_dir, output_dir, capsys):
    """The message of a training run on data_dir that has to be refused."""
    return run_refused([*SMALL_RUN, "--data-dir", str(data_dir), "--output-dir", str(output_dir)], output_dir, capsys)


# Each edit below breaks a valid dataset in one way and returns the fragments the refusal must name.


def delete_table(name):
    def edit(data_dir):
        (data_dir / name).unlink()
        return [str(data_dir / name), "not found"]

    return edit


def drop_column(name, column):
    def edit(data_dir):
        write_table(data_dir, name, read_table(data_dir, name).drop(columns=column))
        return [str(data_dir / name), column]

    return edit


def duplicate_row_id(name):
    def edit(data_dir):
        table = read_table(data_dir, name)
        table.loc[3, "row_id"] = table.loc[2, "row_id"]
        write_table(data_dir, name, table)
        return [str(data_dir / name), "duplicate", table.loc[2, "row_id"]]

    return edit


def empty_row_id(data_dir):
    table = read_table(data_dir, "train.csv")
    table.loc[4, "row_id"] = ""
    write_table(data_dir, "train.csv", table)
    return [str(data_dir / "train.csv"), "empty row_id", "line(s) 6"]  # Line 1 is the header.


def labels_not_one_hot(data_dir):
    """Two ones, no one, a word, and a partly blank row: none of them is a one-hot label."""
    table = read_table(data_dir, "train.csv")
    bad_labels = [("1", "1", "0"), ("0", "0", "0"), ("yes", "0", "0"), ("", "1", "")]
    for row, labels in enumerate(bad_labels):
        table.loc[row, list(script.CLASS_NAMES)] = labels
    write_table(data_dir, "train.csv", table)
    return [str(data_dir / "train.csv"), "one-hot", *table["row_id"][: len(bad_labels)]]


def empty_training_image_path(data_dir):
    table = read_table(data_dir, "train.csv")
    table.loc[7, "image_path"] = ""
    write_table(data_dir, "train.csv", table)
    return [str(data_dir / "train.csv"), "empty image_path", table.loc[7, "row_id"]]


def replace_image(name, replace):
    """Replace the image of the table's sixth row, and expect its path and row_id in the message."""

    def edit(data_dir):
        table = read_table(data_dir, name)
        image = data_dir / table.loc[5, "image_path"]
        replace(image)
        return [str(data_dir / name), str(image), table.loc[5, "row_id"]]

    return edit


def delete_file(path):
    path.unlink()


def write_text(path):
    path.write_text("this is not a picture\n")


def empty_file(path):
    path.write_bytes(b"")


@pytest.mark.parametrize(
    "break_dataset",
    [
        pytest.param(delete_table("train.csv"), id="missing train.csv"),
        pytest.param(delete_table("test.csv"), id="missing test.csv"),
        pytest.param(drop_column("train.csv", "severe"), id="train.csv without a label column"),
        pytest.param(drop_column("test.csv", "image_path"), id="test.csv without image_path"),
        pytest.param(duplicate_row_id("train.csv"), id="duplicate row_id in train.csv"),
        pytest.param(duplicate_row_id("test.csv"), id="duplicate row_id in test.csv"),
        pytest.param(empty_row_id, id="empty row_id"),
        pytest.param(labels_not_one_hot, id="labels not one-hot"),
        pytest.param(empty_training_image_path, id="training row without image_path"),
        pytest.param(replace_image("train.csv", delete_file), id="missing training image"),
        pytest.param(replace_image("test.csv", delete_file), id="missing test image"),
        pytest.param(replace_image("train.csv", write_text), id="text file named .png"),
        pytest.param(replace_image("test.csv", empty_file), id="zero-byte image"),
    ],
)
def test_bad_dataset_is_refused_with_a_message_naming_the_fault(break_dataset, data_dir, output_dir, capsys):
    """Each kind of bad input gets exit code 2 and a message naming the file and the rows at fault."""
    expected_fragments = break_dataset(data_dir)
    message = refuse_training(data_dir, output_dir, capsys)
    for fragment in expected_fragments:
        assert fragment in message


def test_untouched_dataset_is_accepted(data_dir):
    """The dataset the refusal tests break is valid as generated, so each refusal is caused by its edit."""
    table = script.load_train_table(data_dir)
    test_table = script.load_test_table(data_dir)
    assert len(table) == 5 * synthetic.ROWS_PER_STUDY and len(test_table) == synthetic.ROWS_PER_STUDY
    assert script.split_folds(table, 1, script.VAL_FRACTION, script.SEED)


def label_rows_not_one_hot(data_dir, rows):
    table = read_table(data_dir, "train.csv")
    table.loc[rows, list(script.CLASS_NAMES)] = ("1", "1", "0")
    write_table(data_dir, "train.csv", table)


def delete_training_images(data_dir, rows):
    for image_path in read_table(data_dir, "train.csv")["image_path"][rows]:
        (data_dir / image_path).unlink()


@pytest.mark.parametrize("break_rows", [label_rows_not_one_hot, delete_training_images])
def test_message_lists_twenty_row_ids_then_how_many_more(break_rows, data_dir, output_dir, capsys):
    """With 25 bad rows the message names the first 20 and says "and 5 more", instead of flooding stderr."""
    rows = list(range(BAD_ROW_COUNT))
    break_rows(data_dir, rows)
    message = refuse_training(data_dir, output_dir, capsys)
    bad_row_ids = read_table(data_dir, "train.csv")["row_id"][rows]
    assert sum(row_id in message for row_id in bad_row_ids) == 20
    assert f"and {BAD_ROW_COUNT - 20} more" in message


def test_rows_with_all_labels_blank_are_dropped_and_counted(data_dir, capsys):
    """Unlabelled rows (all three labels blank, spaces included) are not an error: dropped, with a count."""
    table = read_table(data_dir, "train.csv")
    table.loc[[0, 1], list(script.CLASS_NAMES)] = ""
    table.loc[2, list(script.CLASS_NAMES)] = " "
    write_table(data_dir, "train.csv", table)
    loaded = script.load_train_table(data_dir)
    assert "dropped 3 row(s)" in capsys.readouterr().out
    assert loaded["row_id"].tolist() == table["row_id"][3:].tolist()


@pytest.mark.parametrize(
    "model_file",
    ["missing", "not a model"],
)
def test_predict_refuses_an_unusable_model(model_file, data_dir, output_dir, tmp_path, capsys):
    """predict names the --model file it cannot use, and writes nothing."""
    model_path = tmp_path / "model.keras"
    if model_file == "not a model":
        model_path.write_text("this is not a Keras model\n")
    message = run_refused(
        ["predict", "--model", str(model_path), "--data-dir", str(data_dir), "--output-dir", str(output_dir)],
        output_dir,
        capsys,
    )
    assert str(model_path) in message


def test_command_line_run_with_a_deleted_training_image_is_refused(data_dir, output_dir):
    """As a user runs it: `python script.py` with one training image deleted exits 2, names the file, no
    traceback, and writes no submission."""
    image = data_dir / read_table(data_dir, "train.csv").loc[0, "image_path"]
    image.unlink()
    completed = subprocess.run(
        [
            sys.executable,
            str(REPOSITORY / "script.py"),
            *SMALL_RUN,
            "--data-dir",
            str(data_dir),
            "--output-dir",
            str(output_dir),
        ],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 2, completed.stderr
    assert str(image) in completed.stderr
    assert "Traceback" not in completed.stderr
    # Only the one message: TensorFlow's start-up and cuInit lines are kept out of stderr.
    assert completed.stderr.startswith("error: ") and completed.stderr.count("\n") == 1, completed.stderr
    assert not (output_dir / "submission.csv").exists()


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


def test_a_competition_folder_whose_test_listing_has_no_rows_is_refused_before_training(tmp_path, capsys):
    """A test listing with a header and no rows used to be found only after the localiser had trained (18 minutes on
    real MR); it is refused up front, with the way to train without a test set, and nothing is written."""
    competition = tmp_path / "competition"
    competition.mkdir()
    (competition / "train_series_descriptions.csv").write_text("study_id,series_id,series_description\n1,2,T1\n")
    (competition / "test_series_descriptions.csv").write_text("study_id,series_id,series_description\n")
    output_dir = tmp_path / "output"
    assert script.main(["--data-dir", str(competition), "--output-dir", str(output_dir)]) == 2
    message = capsys.readouterr().err
    assert f"{competition / 'test_series_descriptions.csv'}: has a header but no rows" in message
    assert "--no-test" in message and not output_dir.exists()


def test_weights_that_are_no_hdf5_file_are_refused_before_anything_is_written(tmp_path, capsys):
    root = seed_layout(tmp_path / "data")
    weights = tmp_path / "weights.h5"
    weights.write_text("not weights\n")
    output_dir = tmp_path / "output"
    assert script.main(["--weights", str(weights), "--data-dir", str(root), "--output-dir", str(output_dir)]) == 2
    assert f"--weights {weights}: not an HDF5 weights file" in capsys.readouterr().err
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
