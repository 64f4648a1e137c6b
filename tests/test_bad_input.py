"""Bad and odd input: malformed CSV files are refused cleanly; odd but valid data trains and keeps its row_ids.

Hypothesis damages a valid train.csv / test.csv pair in the ways real files go wrong, and script.main must
either accept the pair or refuse it with exit code 2 and one message on stderr: never a traceback, and nothing
written. Validation finishes before training starts, so training is replaced by a stand-in that stops the run
at once: reaching it means the input was accepted, and no model is ever built for these cases.

Each file reader on its own: every CSV the script reads refuses an empty or header-only file by name, a path that
is no regular file is named for what it is (missing, a folder, /dev/null), and bad coordinates or a repeated
study in the wide train.csv are refused naming the line or study. Odd but valid tables (", " between cells, test
row_ids that are also training rows) are read, with a warning where one is due.

One real tiny training run then takes odd but valid images and row_ids all the way to submission.csv.
"""

import codecs
import csv
import dataclasses
import io
import os
import string
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import synthetic
from conftest import QUICK_RUN, SUBMISSION_HEADER, script, seed_layout
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

ACCEPT, REJECT, EITHER = "accept", "reject", "either"
REQUIRED_COLUMNS = {"train.csv": script.TRAIN_COLUMNS, "test.csv": script.TEST_COLUMNS}
TRAIN_ROWS, TEST_ROWS = 16, 5  # Each train row is its own study; each class has 5 or more, enough for 5 folds.
VALIDATION_RUN = ["--weights", "none"]

# Where each kind of broken image_path points, relative to the data folder.
BROKEN_IMAGE_PATHS = {
    "missing": "images/train/no_such_image.png",
    "not_an_image": "train.csv",
    "folder": "images",
    "zero_bytes": "images/zero_bytes.png",
    "empty": "",
}


# ============================================================================== malformed CSV files


def encode(table, encoding="utf-8"):
    """The CSV bytes of a table (a header row, then data rows), written as the csv module writes them."""
    text = io.StringIO()
    csv.writer(text).writerows(table)
    return text.getvalue().encode(encoding)


def row_ids(table):
    """The row_ids of a table whose first column is row_id."""
    return [row[0] for row in table[1:]]


@dataclasses.dataclass(frozen=True)
class Damaged:
    """A damaged file's bytes and what the script must do with it.

    verdict is ACCEPT, REJECT or EITHER. row_ids, when given, is what the loader must return if the script
    accepts the file, so an acceptance that silently misreads the rows still fails.
    """

    content: bytes
    verdict: str
    row_ids: list = None


@dataclasses.dataclass(frozen=True)
class Corruption:
    """One kind of damage to one of the two tables; detail is what hypothesis drew for it."""

    kind: str
    file_name: str
    detail: object = None

    def apply(self, table):
        """Damage a copy of the valid table (a header row, then data rows; row_id first)."""
        return DAMAGES[self.kind](self, [list(row) for row in table])


def missing_column(corruption, table):
    """One required column left out entirely."""
    kept = [index for index, name in enumerate(table[0]) if name != corruption.detail]
    return Damaged(encode([[row[index] for index in kept] for row in table]), REJECT)


def extra_column(corruption, table):
    """An unexpected column, of any name and content, anywhere: the script reads columns by name."""
    position, name, value = corruption.detail
    cells = [name] + [value] * (len(table) - 1)
    return Damaged(
        encode([row[:position] + [cell] + row[position:] for row, cell in zip(table, cells)]), ACCEPT, row_ids(table)
    )


def duplicate_column(corruption, table):
    """A required column appears twice, the copy holding other values: which one is meant is anyone's guess."""
    column, padding = corruption.detail
    index = table[0].index(column)
    copy = [padding + column] + [row[index] for row in reversed(table[1:])]
    return Damaged(encode([row + [cell] for row, cell in zip(table, copy)]), REJECT)


def trailing_delimiter(corruption, table):
    """Every data row, but not the header, ends with a comma, as some spreadsheet exports write them."""
    return Damaged(encode(table[:1] + [row + [""] for row in table[1:]]), EITHER, row_ids(table))


def label_value(corruption, table):
    """A label cell that is not 0 or 1: text, a fraction, a negative or another number."""
    column, value = corruption.detail
    table[1][table[0].index(column)] = value
    return Damaged(encode(table), REJECT)


def byte_order_mark(corruption, table):
    """The UTF-8 byte-order mark that Excel writes at the start of a file."""
    return Damaged(codecs.BOM_UTF8 + encode(table), ACCEPT, row_ids(table))


def header_whitespace(corruption, table):
    """Spaces and tabs around every header name."""
    before, after = corruption.detail
    table[0] = [before + name + after for name in table[0]]
    return Damaged(encode(table), ACCEPT, row_ids(table))


def empty_file(corruption, table):
    """Zero bytes, not even a header."""
    return Damaged(b"", REJECT)


def header_only(corruption, table):
    """A header and no rows: nothing to train on, or nothing to predict, so there is no use in running."""
    return Damaged(encode(table[:1]), REJECT)


def foreign_encoding(corruption, table):
    """The file saved as Latin-1, Windows-1252 or UTF-16 rather than UTF-8, with an é to tell them apart."""
    table[1][0] += "_café"
    return Damaged(encode(table, corruption.detail), REJECT)


def random_bytes(corruption, table):
    """Raw bytes inside a quoted row_id: valid UTF-8 is a legitimate (if odd) row_id, anything else is refused."""
    placeholder = "RANDOM_BYTES_GO_HERE"
    original = table[1][0]
    table[1][0] = placeholder
    quoted = b'"' + original.encode() + corruption.detail.replace(b'"', b'""') + b'"'
    content = encode(table).replace(placeholder.encode(), quoted)
    try:
        table[1][0] = original + corruption.detail.decode("utf-8")
    except UnicodeDecodeError:
        return Damaged(content, REJECT)
    return Damaged(content, ACCEPT, row_ids(table))


def quoted_row_id(corruption, table):
    """A row_id with commas and quotes in it, so the csv writer has to quote it."""
    table[1][0] = f'"{corruption.detail}", {table[1][0]}'
    return Damaged(encode(table), ACCEPT, row_ids(table))


def blank_lines(corruption, table):
    """Empty or whitespace-only lines, anywhere, even before the header: readers skip them."""
    positions, line = corruption.detail
    expected = row_ids(table)
    for position in sorted(positions, reverse=True):
        table.insert(position, [line] if line else [])
    return Damaged(encode(table), ACCEPT, expected)


def few_rows(corruption, table):
    """Only the first few training rows: too few studies, or too few rows of each class, to split is refused."""
    table = table[: 1 + corruption.detail]
    return Damaged(encode(table), EITHER, row_ids(table))


def mixed_row_ids(corruption, table):
    """One competition row_id among plain ones. The metric refuses to score such a mix, so train.csv must be
    refused before training rather than after it; test.csv is not scored and may mix freely."""
    table[1][0] = "4003253_spinal_canal_stenosis_l1_l2"
    if corruption.file_name == "train.csv":
        return Damaged(encode(table), REJECT)
    return Damaged(encode(table), ACCEPT, row_ids(table))


def duplicate_row(corruption, table):
    """A row repeated at the end, as a careless concatenation leaves it."""
    return Damaged(encode(table + [table[1]]), REJECT)


def broken_image_path(corruption, table):
    """A train row needs a real image; a test row may leave image_path empty on purpose (it gets a constant)."""
    table[1][table[0].index("image_path")] = BROKEN_IMAGE_PATHS[corruption.detail]
    if corruption.file_name == "test.csv" and corruption.detail == "empty":
        return Damaged(encode(table), ACCEPT, row_ids(table))
    return Damaged(encode(table), REJECT)


DAMAGES = {
    function.__name__: function
    for function in (
        missing_column,
        extra_column,
        duplicate_column,
        trailing_delimiter,
        label_value,
        byte_order_mark,
        header_whitespace,
        empty_file,
        header_only,
        foreign_encoding,
        random_bytes,
        quoted_row_id,
        blank_lines,
        few_rows,
        mixed_row_ids,
        duplicate_row,
        broken_image_path,
    )
}

# Label cells that are not 0 or 1. Floats within rounding of 0 or 1 are left out: whether "1e-400" counts as 0
# is the float parser's business, not the script's.
BAD_LABELS = st.one_of(
    st.sampled_from(["yes", "abc", "0.5", "-1", "2", "nan", "inf", "1 0", "0,1"]),
    st.integers().filter(lambda number: number not in (0, 1)).map(str),
    st.floats(allow_nan=False, allow_infinity=False)
    .filter(lambda number: abs(number) > 1e-3 and abs(number - 1) > 1e-3)
    .map(repr),
    st.text(alphabet=string.ascii_letters, min_size=1, max_size=6),
)
WHITESPACE = st.text(alphabet=" \t", max_size=3)


def corruptions_of(file_name):
    """Every kind of damage that applies to one table, with hypothesis drawing the details."""
    columns = REQUIRED_COLUMNS[file_name]

    def damage(kind, details=st.none()):  # noqa: B008  (a strategy: immutable, shared on purpose)
        return st.builds(Corruption, st.just(kind), st.just(file_name), details)

    extra_names = st.text(max_size=8).filter(lambda name: name.strip() not in columns)
    kinds = [
        damage("missing_column", st.sampled_from(columns)),
        damage("extra_column", st.tuples(st.integers(0, len(columns)), extra_names, st.text(max_size=8))),
        damage("duplicate_column", st.tuples(st.sampled_from(columns), WHITESPACE)),
        damage("trailing_delimiter"),
        damage("byte_order_mark"),
        damage("header_whitespace", st.tuples(WHITESPACE, WHITESPACE)),
        damage("empty_file"),
        damage("header_only"),
        damage("foreign_encoding", st.sampled_from(["latin-1", "cp1252", "utf-16"])),
        damage("random_bytes", st.binary(min_size=1, max_size=8)),
        damage("quoted_row_id", st.text(max_size=8)),
        damage(
            "blank_lines",
            st.tuples(
                st.lists(st.integers(0, TRAIN_ROWS + 1), min_size=1, max_size=3),
                st.sampled_from(["", " ", "\t", " \t "]),
            ),
        ),
        damage("mixed_row_ids"),
        damage("duplicate_row"),
        damage("broken_image_path", st.sampled_from(sorted(BROKEN_IMAGE_PATHS))),
    ]
    if file_name == "train.csv":
        kinds.append(damage("label_value", st.tuples(st.sampled_from(script.CLASS_NAMES), BAD_LABELS)))
        kinds.append(damage("few_rows", st.integers(1, TRAIN_ROWS - 1)))
    return st.one_of(kinds)


class ReachedTraining(Exception):
    """Raised by the stand-in for training: validation passed, so the input was accepted."""


def stop_at_training(*arguments):
    raise ReachedTraining


@dataclasses.dataclass(frozen=True)
class ValidDataset:
    """A valid dataset's folder and the rows of its two tables, kept because each example overwrites the files."""

    root: Path
    tables: dict = dataclasses.field(repr=False)  # Left out of hypothesis' failure reports, which it would swamp.


@pytest.fixture(scope="module")
def valid_dataset(tmp_path_factory):
    """A small valid dataset on disk: TRAIN_ROWS and TEST_ROWS rows of 32-px images."""
    root = tmp_path_factory.mktemp("valid_dataset")
    synthetic.make_dataset(
        root, train_rows=TRAIN_ROWS, test_rows=TEST_ROWS, image_size=32, plain_row_ids=True, class_mix=(1, 1, 1)
    )
    (root / BROKEN_IMAGE_PATHS["zero_bytes"]).touch()
    tables = {}
    for file_name in REQUIRED_COLUMNS:
        with open(root / file_name, newline="", encoding="utf-8") as file:
            tables[file_name] = list(csv.reader(file))
    return ValidDataset(root, tables)


@pytest.fixture
def training_stopped(monkeypatch):
    """Replace training with the stand-in that stops the run as soon as validation has passed."""
    monkeypatch.setattr(script, "train_fold", stop_at_training)


def run_until_training(data_dir, output_dir):
    """The exit code of a train run on data_dir, or ACCEPT once the run gets as far as training."""
    try:
        return script.main([*VALIDATION_RUN, "--data-dir", str(data_dir), "--output-dir", str(output_dir)])
    except ReachedTraining:
        return ACCEPT


# The function-scoped fixtures are meant to span all examples: one stand-in for training, one capture.
# The few_rows damage leaves classes smaller than the folds on purpose, which scikit-learn warns about.
@pytest.mark.filterwarnings("ignore:The least populated class:UserWarning")
@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(corruption=st.one_of(corruptions_of("train.csv"), corruptions_of("test.csv")))
@example(Corruption("missing_column", "train.csv", "severe"))
@example(Corruption("missing_column", "test.csv", "image_path"))
@example(Corruption("extra_column", "train.csv", (0, "notes", "free text, with a comma")))
@example(Corruption("extra_column", "test.csv", (2, "", "")))
@example(Corruption("duplicate_column", "train.csv", ("severe", "")))
@example(Corruption("duplicate_column", "test.csv", ("row_id", " ")))
@example(Corruption("trailing_delimiter", "train.csv"))
@example(Corruption("trailing_delimiter", "test.csv"))
@example(Corruption("label_value", "train.csv", ("moderate", "moderate grade")))
@example(Corruption("label_value", "train.csv", ("normal_mild", "0.5")))
@example(Corruption("label_value", "train.csv", ("severe", "-1")))
@example(Corruption("byte_order_mark", "train.csv"))
@example(Corruption("byte_order_mark", "test.csv"))
@example(Corruption("header_whitespace", "train.csv", (" ", " \t")))
@example(Corruption("header_whitespace", "test.csv", ("\t", " ")))
@example(Corruption("empty_file", "train.csv"))
@example(Corruption("empty_file", "test.csv"))
@example(Corruption("header_only", "train.csv"))
@example(Corruption("header_only", "test.csv"))
@example(Corruption("foreign_encoding", "train.csv", "latin-1"))
@example(Corruption("foreign_encoding", "test.csv", "utf-16"))
@example(Corruption("random_bytes", "train.csv", b"\xff\xfe\x00\x80"))
@example(Corruption("random_bytes", "test.csv", 'é " ,'.encode()))
@example(Corruption("quoted_row_id", "train.csv", 'a, "b"'))
@example(Corruption("quoted_row_id", "test.csv", 'say "hi", then, leave'))
@example(Corruption("blank_lines", "train.csv", ((0, 2, 99), "")))
@example(Corruption("blank_lines", "test.csv", ((1, 3), " \t ")))
@example(Corruption("few_rows", "train.csv", 3))
@example(Corruption("few_rows", "train.csv", 9))
@example(Corruption("mixed_row_ids", "train.csv"))
@example(Corruption("mixed_row_ids", "test.csv"))
@example(Corruption("duplicate_row", "train.csv"))
@example(Corruption("duplicate_row", "test.csv"))
@example(Corruption("broken_image_path", "train.csv", "missing"))
@example(Corruption("broken_image_path", "train.csv", "empty"))
@example(Corruption("broken_image_path", "test.csv", "not_an_image"))
@example(Corruption("broken_image_path", "test.csv", "empty"))
def test_malformed_csv_is_accepted_or_refused_cleanly(valid_dataset, training_stopped, capsys, corruption):
    """Damaged input either passes validation with its rows read right, or ends in exit code 2 with one
    message naming the damaged file, without a traceback and without writing anything."""
    root = valid_dataset.root
    damaged = corruption.apply(valid_dataset.tables[corruption.file_name])
    for file_name, table in valid_dataset.tables.items():
        (root / file_name).write_bytes(damaged.content if file_name == corruption.file_name else encode(table))
    capsys.readouterr()  # Forget the previous example's output.
    with tempfile.TemporaryDirectory() as parent:
        output_dir = Path(parent) / "output"
        result = run_until_training(root, output_dir)
        output_written = output_dir.exists()
    errors = capsys.readouterr().err

    if result == ACCEPT:
        assert damaged.verdict != REJECT, "accepted input that must be refused"
        if damaged.row_ids is not None:
            load = script.load_train_table if corruption.file_name == "train.csv" else script.load_test_table
            assert load(root)["row_id"].tolist() == damaged.row_ids
    else:
        assert result == 2
        assert damaged.verdict != ACCEPT, f"refused valid input: {errors}"
        assert errors.startswith("error: ") and corruption.file_name in errors, errors
        assert "Traceback" not in errors
        assert not output_written, "a refused run must not create its output folder, let alone submission.csv"


# ================================================================================ each reader on its own

COORDINATE_HEADER = "study_id,series_id,instance_number,condition,level,x,y\n"
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


@pytest.mark.parametrize("row", [0, 1])
def test_a_blank_coordinate_is_refused_naming_the_line(row, tmp_path):
    """A blank x (or instance_number) read as NaN and crashed the instance lookup; now the line is named."""
    path = tmp_path / "coordinates.csv"
    cells = [["7", "70", "3", "Spinal Canal Stenosis", "L1/L2", "10.5", "20.5"]] * 2
    cells[row] = [*cells[row][:5], "", "20.5"] if row == 0 else [*cells[row][:2], "", *cells[row][3:]]
    path.write_text(COORDINATE_HEADER + "".join(",".join(line) + "\n" for line in cells))
    with pytest.raises(script.InputError, match=f"finite numbers; blank or infinite on line.s. {row + 2}"):
        script.read_coordinates(path)


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


# ================================================================================= odd but valid tables


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


def test_test_row_ids_that_are_also_training_rows_get_a_one_line_warning(tmp_path, monkeypatch, capsys):
    root = seed_layout(tmp_path / "data")
    train = pd.read_csv(root / "train.csv", dtype=str)
    test = pd.read_csv(root / "test.csv", dtype=str)
    test.loc[0, "row_id"] = train.loc[2, "row_id"]
    test.to_csv(root / "test.csv", index=False)
    monkeypatch.setattr(script, "train_fold", stop_at_training)
    with pytest.raises(ReachedTraining):
        script.main(["--weights", "none", "--data-dir", str(root), "--output-dir", str(tmp_path / "output")])
    warning = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "1 test.csv row_id(s) also appear in train.csv" in warning[0]
    assert train.loc[2, "row_id"] in warning[0]


# ========================================================================== odd but valid data, trained

# Row ids a careless reader would split, strip, renumber or turn into numbers, booleans or missing values.
ODD_ROW_IDS = (
    "a,b",
    'say "hi"',
    '"quoted"',
    "with space",
    " padded ",
    "ünïcødé ✓ 脊椎",
    "007",
    "NA",
    "null",
    "1e5",
    "True",
    "None",
    "nan",
    "-0",
    "1,000",
)
# Pixel formats, sizes and file names the reader must cope with, each made from an 8-bit gray picture.
ODD_IMAGES = {
    "gray16.png": lambda picture: synthetic.encode_picture(picture, "gray16"),
    "rgba.png": lambda picture: synthetic.encode_picture(picture, "bgra"),
    "bgr.png": lambda picture: synthetic.encode_picture(picture, "bgr"),
    "gray8.png": lambda picture: picture,
    "small.png": lambda picture: cv2.resize(picture, (5, 7)),
    "large.png": lambda picture: cv2.resize(picture, (3000, 2000)),
    "uppercase.PNG": lambda picture: picture,
    "uppercase.JPG": lambda picture: picture,
}


def write_odd_split(root, file_name, generator):
    """One table holding every odd row_id, the rows taking the odd images in turn; labels cycle the classes."""
    split = Path(file_name).stem
    (root / "images" / split).mkdir(parents=True)
    table = [list(REQUIRED_COLUMNS[file_name])]
    for index, row_id in enumerate(ODD_ROW_IDS):
        label = index % len(script.CLASS_NAMES)
        image_name = list(ODD_IMAGES)[index % len(ODD_IMAGES)]
        image_path = f"images/{split}/{index:02d}_{image_name}"
        if not cv2.imwrite(str(root / image_path), ODD_IMAGES[image_name](synthetic.draw_spine(label, 32, generator))):
            raise OSError(f"could not write {image_path}")
        one_hot = ["1" if class_index == label else "0" for class_index in range(len(script.CLASS_NAMES))]
        table.append([row_id, image_path, *one_hot] if split == "train" else [row_id, image_path])
    (root / file_name).write_bytes(encode(table))


@pytest.fixture(scope="module")
def odd_run(tmp_path_factory):
    """One real tiny training run on odd but valid rows; returns its data and output folders.

    Each odd row_id is its own study, so there are enough studies for the default validation split.
    """
    data_dir = tmp_path_factory.mktemp("odd_dataset")
    output_dir = tmp_path_factory.mktemp("odd_run")
    generator = np.random.default_rng(0)
    for file_name in REQUIRED_COLUMNS:
        write_odd_split(data_dir, file_name, generator)
    exit_code = script.main([*QUICK_RUN, "--data-dir", str(data_dir), "--output-dir", str(output_dir)])
    assert exit_code == 0
    return data_dir, output_dir


def read_column(path, column):
    """One column's fields exactly as the file holds them, unquoted by the csv module and nothing else."""
    with open(path, newline="", encoding="utf-8") as file:
        return [row[column] for row in csv.DictReader(file)]


def test_submission_keeps_every_odd_row_id_byte_for_byte(odd_run):
    """submission.csv holds test.csv's row_ids in test.csv's order, each field exactly as test.csv spells it."""
    data_dir, output_dir = odd_run
    submitted = read_column(output_dir / "submission.csv", "row_id")
    assert submitted == read_column(data_dir / "test.csv", "row_id") == list(ODD_ROW_IDS)


def test_odd_images_get_valid_probabilities(odd_run):
    """Every odd image, from 5×7 to 3000×2000 px and 8-bit gray to 16-bit or RGBA, gets a distribution."""
    _, output_dir = odd_run
    probabilities = np.array(
        [[float(value) for value in read_column(output_dir / "submission.csv", name)] for name in script.CLASS_NAMES]
    ).T
    assert probabilities.shape == (len(ODD_ROW_IDS), len(script.CLASS_NAMES))
    assert np.isfinite(probabilities).all() and (probabilities >= 0).all() and (probabilities <= 1).all()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)


def test_validation_rows_keep_their_odd_row_ids(odd_run):
    """The out-of-fold predictions name validation rows by train.csv's row_ids, unchanged."""
    _, output_dir = odd_run
    validation_row_ids = read_column(output_dir / "oof.csv", "row_id")
    assert validation_row_ids and set(validation_row_ids) <= set(ODD_ROW_IDS)
