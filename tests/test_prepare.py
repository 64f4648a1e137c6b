"""The prepare step: competition DICOM layout in, seed layout out. One crop per labelled row, centred on its point,
its channels the neighbouring slices; a damaged competition's faults (points outside their slice or on a missing
instance, series without PixelSpacing, undecodable files) skipped and named in the summary; every lossless
encoding crops alike; a rerun keeps only the crops cut from the same file, point and settings."""

import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import cv2
import dicom_synthetic
import numpy as np
import pandas as pd
import pytest
from conftest import script as P

# Small crops keep the tests fast; 12 mm holds one synthetic marker and no other.
CROP_MM = 12.0
CROP_PIXELS = 32
CENTRE = (CROP_PIXELS - 1) / 2
CROP_OPTIONS = {"crop_mm": CROP_MM, "crop_pixels": CROP_PIXELS, "workers": 2}

# pydicom warns about the deliberately truncated file; the report names it instead.
pytestmark = pytest.mark.filterwarnings("ignore:End of file reached:UserWarning")


def prepare(competition, out_dir, **options):
    """Run the prepare step with the tests' crop size."""
    return P.prepare_competition(
        competition.root, out_dir, crop_mm=CROP_MM, crop_pixels=CROP_PIXELS, workers=2, **options
    )


@pytest.fixture(scope="module")
def competition(tmp_path_factory):
    """A synthetic competition folder with three train and two test studies."""
    return dicom_synthetic.write_synthetic_competition(tmp_path_factory.mktemp("competition"))


@pytest.fixture(scope="module")
def prepared(competition, tmp_path_factory):
    """The train split prepared once: (output folder, summary, train.csv table)."""
    out_dir = tmp_path_factory.mktemp("seed")
    summary = prepare(competition, out_dir)
    return out_dir, summary, pd.read_csv(out_dir / "train.csv")


def read_rgb(path):
    """A PNG as an RGB uint8 array."""
    return cv2.imread(str(path), cv2.IMREAD_COLOR)[..., ::-1]


def row_id_pattern():
    """The sample_submission row_id pattern: {study_id}_{condition}_{level}."""
    return re.compile(rf"\d+_({'|'.join(P.CONDITIONS)})_({'|'.join(P.LEVELS)})")


def expected_train_row_ids(competition):
    """Labelled rows with a coordinate and a readable image."""
    return (
        set(competition.row_instances)
        - competition.blank_row_ids
        - competition.uncoordinated_row_ids
        - competition.unreadable_row_ids
    )


def assert_centred(image):
    """The labelled slice's marker (green channel) sits on the crop's centre."""
    green = image[..., 1]
    rows, columns = np.nonzero(green >= 200)
    assert abs(rows.mean() - CENTRE) < 0.5 and abs(columns.mean() - CENTRE) < 0.5
    assert green[int(CENTRE) : int(CENTRE) + 2, int(CENTRE) : int(CENTRE) + 2].min() == 255


def test_one_crop_per_labelled_row(prepared, competition):
    out_dir, summary, table = prepared
    assert list(table.columns) == ["row_id", "image_path", *P.CLASS_NAMES]
    assert set(table["row_id"]) == expected_train_row_ids(competition)
    assert table["row_id"].is_unique
    assert table["row_id"].str.fullmatch(row_id_pattern()).all()
    assert (table["image_path"] == "images/train/" + table["row_id"] + ".png").all()
    assert sorted(path.name for path in (out_dir / "images" / "train").iterdir()) == sorted(table["row_id"] + ".png")
    assert summary["rows"] == summary["images_written"] == len(table)
    for path in table["image_path"]:
        assert read_rgb(out_dir / path).shape == (CROP_PIXELS, CROP_PIXELS, 3)


def test_one_hot_labels_match_train_csv(prepared, competition):
    _, _, table = prepared
    labels = pd.read_csv(competition.root / "train.csv").set_index("study_id")
    for row in table.itertuples(index=False):
        study_id, label = row.row_id.split("_", 1)
        expected = np.eye(3, dtype=int)[P.SEVERITY_NAMES.index(labels.loc[int(study_id), label])]
        assert [getattr(row, name) for name in P.CLASS_NAMES] == expected.tolist()


def test_every_crop_is_centred_on_its_labelled_point(prepared):
    out_dir, _, table = prepared
    for path in table["image_path"]:
        assert_centred(read_rgb(out_dir / path))


def test_channels_are_previous_labelled_and_next_slice(prepared, competition):
    # Synthetic backgrounds brighten with the instance number, so the channels' medians must
    # order like the instances they came from; at a series' end the edge slice is reused, and a
    # corrupt neighbour is replaced by the labelled slice.
    out_dir, _, table = prepared
    for row_id, path in zip(table["row_id"], table["image_path"]):
        series_id, instance_number = competition.row_instances[row_id]
        series_dir = competition.root / "train_images" / row_id.split("_")[0] / str(series_id)
        listed = sorted(int(file.stem) for file in series_dir.glob("*.dcm"))
        index = listed.index(instance_number)
        neighbours = [listed[max(index - 1, 0)], instance_number, listed[min(index + 1, len(listed) - 1)]]
        corrupt = {int(file.stem) for file in competition.corrupt_paths if file.parent == series_dir}
        neighbours = [instance_number if number in corrupt else number for number in neighbours]
        medians = np.median(read_rgb(out_dir / path).reshape(-1, 3), axis=0)
        assert np.sign(np.diff(medians)).tolist() == np.sign(np.diff(neighbours)).tolist(), row_id


def test_monochrome1_is_inverted(prepared, competition):
    out_dir, _, table = prepared
    monochrome1 = [
        path
        for row_id, path in zip(table["row_id"], table["image_path"])
        if competition.series_kinds[competition.row_instances[row_id][0]].photometric_interpretation == "MONOCHROME1"
    ]
    assert monochrome1
    for path in monochrome1:
        image = read_rgb(out_dir / path)
        # The marker is displayed bright on a darker background, as on MONOCHROME2 series.
        assert image[int(CENTRE), int(CENTRE), 1] == 255
        assert np.median(image[..., 1]) < 128


def test_crop_past_the_image_edge_is_padded_by_pixel_spacing(prepared, competition):
    # This point sits near the top left corner of a series with 0.8 mm rows and 0.6 mm columns.
    out_dir, _, _ = prepared
    kind = dicom_synthetic.SERIES_KINDS[1]
    _, x, y = dicom_synthetic.label_point(1, "left_neural_foraminal_narrowing", 0)
    row_spacing, column_spacing = kind.pixel_spacing
    image = read_rgb(out_dir / "images" / "train" / "1000_left_neural_foraminal_narrowing_l1_l2.png")
    assert_centred(image)
    black_columns = int((image[..., 1].max(axis=0) < 5).sum())
    black_rows = int((image[..., 1].max(axis=1) < 5).sum())
    # The image starts half a pixel before pixel 0's centre; the padding fills the rest of the
    # half crop beyond that edge.
    millimetres_to_pixels = CROP_PIXELS / CROP_MM
    assert abs(black_columns - (CROP_MM / 2 - (x + 0.5) * column_spacing) * millimetres_to_pixels) <= 1
    assert abs(black_rows - (CROP_MM / 2 - (y + 0.5) * row_spacing) * millimetres_to_pixels) <= 1


def test_crop_size_in_millimetres_follows_pixel_spacing():
    # A bright rectangle 12.5 mm tall and wide (25 rows of 0.5 mm, 50 columns of 0.25 mm)
    # must fill the middle half of a 24 mm crop in both directions.
    image = np.zeros((200, 300), np.uint8)
    image[100 - 12 : 100 + 13, 150 - 25 : 150 + 25] = 255
    crop = P.crop_around(image, 149.5, 100.0, row_spacing=0.5, column_spacing=0.25, crop_mm=24.0, crop_pixels=48)
    assert crop.shape == (48, 48)
    assert abs((crop[:, 24] > 127).sum() - 25) <= 1
    assert abs((crop[24, :] > 127).sum() - 25) <= 1


def test_missing_and_corrupt_files_are_reported_and_skipped(prepared, competition):
    _, summary, table = prepared
    for path in competition.missing_paths:
        assert any(name.rstrip("/") == str(path) for name in summary["missing_files"])
    for path in competition.corrupt_paths:
        assert any(name.startswith(f"{path}:") for name in summary["undecodable_files"])
    assert not set(table["row_id"]) & competition.unreadable_row_ids
    assert summary["blank_label"] == len(competition.blank_row_ids)
    assert summary["without_coordinate"] == len(competition.uncoordinated_row_ids)
    assert summary["without_image"] == len(competition.unreadable_row_ids)


def test_test_split_has_25_rows_per_study_and_empty_paths_without_coordinate(competition, tmp_path):
    summary = prepare(competition, tmp_path, split="test", coordinates=competition.test_coordinates_path)
    table = pd.read_csv(tmp_path / "test.csv", keep_default_na=False)
    assert list(table.columns) == ["row_id", "image_path"]
    expected = {f"{study}_{label}" for study in competition.test_study_ids for label in P.WIDE_LABEL_COLUMNS}
    assert len(table) == 25 * len(competition.test_study_ids) and set(table["row_id"]) == expected
    coordinates = P.read_coordinates(competition.test_coordinates_path)
    has_coordinate = table["row_id"].isin(coordinates["row_id"])
    assert (table["image_path"] == ("images/test/" + table["row_id"] + ".png").where(has_coordinate, "")).all()
    assert summary["without_coordinate"] == (~has_coordinate).sum()
    assert has_coordinate.any() and not has_coordinate.all()
    for path in table.loc[has_coordinate, "image_path"]:
        assert_centred(read_rgb(tmp_path / path))


def test_test_split_without_coordinates_has_only_empty_paths(competition, tmp_path):
    prepare(competition, tmp_path, split="test")
    table = pd.read_csv(tmp_path / "test.csv", keep_default_na=False)
    assert len(table) == 25 * len(competition.test_study_ids)
    assert (table["image_path"] == "").all()


def test_rerun_keeps_existing_crops_and_resumes_the_rest(competition, tmp_path):
    first = prepare(competition, tmp_path)
    paths = sorted((tmp_path / "images" / "train").glob("*.png"))
    modified = {path: path.stat().st_mtime_ns for path in paths}
    # Deleting one crop stands in for a run killed before writing it.
    interrupted, interrupted_bytes = paths[0], paths[0].read_bytes()
    interrupted.unlink()
    second = prepare(competition, tmp_path)
    assert (second["images_written"], second["images_kept"]) == (1, first["images_written"] - 1)
    assert interrupted.read_bytes() == interrupted_bytes  # The resumed crop uses the same window.
    assert all(path.stat().st_mtime_ns == modified[path] for path in paths[1:])
    assert not list(tmp_path.rglob(".partial-*"))  # The temporary names of atomic writes.
    assert second["rows"] == first["rows"]


@pytest.mark.parametrize("transfer_syntax", ["RLELossless", "JPEG2000Lossless"])
def test_compressed_slices_decode(transfer_syntax, tmp_path):
    if transfer_syntax == "JPEG2000Lossless":
        pytest.importorskip("openjpeg", reason="JPEG 2000 needs pylibjpeg-openjpeg")
    import pydicom.uid

    uid = getattr(pydicom.uid, transfer_syntax)
    kind = dicom_synthetic.SeriesKind("Axial T2", (), "MONOCHROME2", (0.4, 0.5), (64, 48), uid)
    displayed = dicom_synthetic.displayed_slice(kind, 3, [(20.0, 30.0)], np.random.default_rng(0))
    dicom_synthetic.write_dicom(tmp_path / "3.dcm", kind, 1, 10, 3, displayed)
    pixels, row_spacing, column_spacing = P.read_slice(tmp_path / "3.dcm")
    assert (row_spacing, column_spacing) == (0.4, 0.5)
    np.testing.assert_array_equal(pixels, np.clip(np.round(displayed), 0, 65535))


def test_missing_csv_or_column_raises_input_error(tmp_path):
    with pytest.raises(P.InputError, match="train.csv"):
        P.prepare_competition(tmp_path, tmp_path / "out")
    pd.DataFrame({"study_id": [1]}).to_csv(tmp_path / "train.csv", index=False)
    with pytest.raises(P.InputError, match="spinal_canal_stenosis_l1_l2"):
        P.prepare_competition(tmp_path, tmp_path / "out")
    with pytest.raises(P.InputError, match="test_series_descriptions.csv"):
        P.prepare_competition(tmp_path, tmp_path / "out", split="test")
    with pytest.raises(P.InputError, match="split"):
        P.prepare_competition(tmp_path, tmp_path / "out", split="valid")


def test_missing_image_folder_raises_input_error(tmp_path):
    dicom_synthetic.random_labels([7], np.random.default_rng(0)).to_csv(tmp_path / "train.csv", index=False)
    coordinates = [(7, 70, 1, "Spinal Canal Stenosis", "L1/L2", 10.0, 20.0)]
    columns = ["study_id", "series_id", "instance_number", "condition", "level", "x", "y"]
    pd.DataFrame(coordinates, columns=columns).to_csv(tmp_path / "train_label_coordinates.csv", index=False)
    with pytest.raises(P.InputError, match="train_images"):
        P.prepare_competition(tmp_path, tmp_path / "out")


def test_prepare_summary_prints_counts_and_names_broken_files(competition, tmp_path, capsys):
    P.print_prepare_summary(
        P.prepare_competition(competition.root, tmp_path, crop_mm=CROP_MM, crop_pixels=CROP_PIXELS, workers=2)
    )
    printed = capsys.readouterr().out
    assert f"{len(expected_train_row_ids(competition))} rows to {tmp_path / 'train.csv'}" in printed
    assert f"{len(competition.blank_row_ids)} with a blank label" in printed
    for path in competition.missing_paths + competition.corrupt_paths:
        assert str(path) in printed


def test_missing_pydicom_raises_input_error(monkeypatch, competition, tmp_path):
    monkeypatch.setitem(sys.modules, "pydicom", None)
    with pytest.raises(P.InputError, match="pip install pydicom"):
        P.load_pydicom()
    with pytest.raises(P.InputError, match="pip install pydicom"):
        prepare(competition, tmp_path / "seed")


def test_prepare_workers_started_before_pandas_say_once_that_pydicom_is_missing(
    monkeypatch, competition, tmp_path, capsys
):
    """The command forks its workers first (start_decoding_workers) and they import pydicom: its absence is still one
    error line and exit code 2, and no worker is left running."""
    monkeypatch.setitem(sys.modules, "pydicom", None)
    argv = ["prepare", "--competition-dir", str(competition.root), "--out-dir", str(tmp_path / "out"), "--workers", "2"]
    assert P.main(argv) == 2
    message = capsys.readouterr().err
    assert message.startswith("error: reading DICOM files needs pydicom") and message.count("\n") == 1
    assert P.started_workers is None and not P.multiprocessing.active_children()


def test_prepare_workers_started_early_end_with_a_run_that_stops_before_reading(tmp_path, capsys):
    """A run refused before any DICOM is read (no such folder) ends the workers it forked at its start."""
    argv = ["prepare", "--competition-dir", str(tmp_path / "nowhere"), "--out-dir", str(tmp_path / "out")]
    assert P.main([*argv, "--workers", "2"]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert P.started_workers is None and not P.multiprocessing.active_children()


def test_coordinates_accept_snake_case_and_pick_duplicates_by_position_not_row_order(tmp_path):
    rows = [
        (7, 70, 9, "Spinal Canal Stenosis", "L1/L2", 1.0, 2.0),
        (7, 70, 4, "Spinal Canal Stenosis", "L1/L2", 3.0, 4.0),
        (7, 71, 2, "left_subarticular_stenosis", "l5_s1", 5.0, 6.0),
    ]
    columns = ["study_id", "series_id", "instance_number", "condition", "level", "x", "y"]
    pd.DataFrame(rows, columns=columns).to_csv(tmp_path / "forward.csv", index=False)
    pd.DataFrame(rows[::-1], columns=columns).to_csv(tmp_path / "backward.csv", index=False)
    forward = P.read_coordinates(tmp_path / "forward.csv")
    backward = P.read_coordinates(tmp_path / "backward.csv")
    pd.testing.assert_frame_equal(forward, backward)
    assert forward["row_id"].tolist() == ["7_left_subarticular_stenosis_l5_s1", "7_spinal_canal_stenosis_l1_l2"]
    assert forward["instance_number"].tolist() == [2, 4]


# ----------------------------------------------------------------------------- a damaged competition


def test_points_outside_their_slice_or_instance_are_skipped_and_named(damaged_competition):
    """x=5000, y=-300 gave an all-black crop that was trained on; now it is skipped and named by row_id, like a
    point on an instance the series lacks."""
    _, summary, printed, _, table, _ = damaged_competition
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
    assert P.crop_inside_share((100, 100), 50, 50, 1.0, 1.0, 20.0) == 1.0
    assert P.crop_inside_share((100, 100), -0.5, -0.5, 1.0, 1.0, 20.0) == pytest.approx(0.25)
    assert P.crop_inside_share((100, 100), 5000, -300, 1.0, 1.0, 20.0) == 0.0


def test_series_without_pixel_spacing_are_named_in_the_summary(damaged_competition):
    """A missing PixelSpacing means 1 mm per pixel, as before, but no longer silently: the series is named."""
    _, summary, printed, _, _, damaged = damaged_competition
    assert summary["series_without_spacing"] == [str(damaged["series"])]
    assert f"Series without PixelSpacing, cropped at 1 mm per pixel: 1: {damaged['series']}." in printed


def test_undecodable_files_are_grouped_by_cause_with_the_install_hint(damaged_competition):
    """The JPEG-LS files without a decoder get one line together, with a count, their paths and what to install,
    instead of pydicom's four lines per file; the truncated files get a line of their own."""
    competition, _, printed, _, _, damaged = damaged_competition
    lines = [line for line in printed.splitlines() if line.startswith("Undecodable DICOM files")]
    jpeg_ls = [line for line in lines if "JPEG-LS" in line]
    assert len(jpeg_ls) == 1 and jpeg_ls[0].startswith("Undecodable DICOM files: 2 with no decoder installed for")
    assert all(str(path) in jpeg_ls[0] for path in damaged["jpeg_ls"]) and "pip install" in jpeg_ls[0]
    truncated = [line for line in lines if "JPEG-LS" not in line]
    assert truncated and all(any(str(path) in line for line in truncated) for path in competition.corrupt_paths)
    assert "\t" not in printed and printed.count("requires") == 0


# ----------------------------------------------------------------------------- encodings and reruns

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
        task = P.SeriesTask(series_dir, (P.Crop("row", 2, 20.0, 30.0, output),))
        result = P.crop_series(task, crop_mm=12.0, crop_pixels=32)
        assert result.written == ["row"] and not result.undecodable_files, (transfer_syntax, result)
        crops[transfer_syntax] = output.read_bytes()
    assert len(set(crops.values())) == 1, [name for name in crops if crops[name] != crops[TRANSFER_SYNTAXES[0]]]


def test_a_rerun_with_other_settings_or_points_cuts_those_crops_again(tmp_path, capsys):
    """prepare keeps crops already written, so a rerun used to keep 12 mm crops beside new 20 mm ones, or a crop of
    a point since corrected. Now only crops cut from the very same file, point and settings are kept."""
    competition = dicom_synthetic.write_synthetic_competition(tmp_path / "competition", test_studies=1)
    out_dir = tmp_path / "prepared"
    first = P.prepare_competition(competition.root, out_dir, **CROP_OPTIONS)
    assert first["images_written"] > 0 and "came from other points" not in capsys.readouterr().out
    larger = P.prepare_competition(competition.root, out_dir, **{**CROP_OPTIONS, "crop_pixels": 16})
    assert (larger["images_written"], larger["images_kept"]) == (first["images_written"], 0)
    assert "came from other points" in capsys.readouterr().out
    crops = sorted((out_dir / "images" / "train").glob("*.png"))
    assert {cv2.imread(str(path)).shape for path in crops} == {(16, 16, 3)}
    coordinates_path = competition.root / "train_label_coordinates.csv"
    coordinates = pd.read_csv(coordinates_path)
    coordinates.loc[len(coordinates) - 1, "x"] += 1.0  # One point corrected by a pixel.
    coordinates.to_csv(coordinates_path, index=False)
    corrected = P.prepare_competition(competition.root, out_dir, **{**CROP_OPTIONS, "crop_pixels": 16})
    assert (corrected["images_written"], corrected["images_kept"]) == (1, first["images_written"] - 1)


# ----------------------------------------------------------------------------- the real competition's CSVs


def real_competition_dir():
    """The real competition CSVs: RSNA_REAL_DIR (itself or its rsna2024 folder), else ../shared/real/rsna2024."""
    configured = os.environ.get("RSNA_REAL_DIR")
    if configured:
        candidates = [Path(configured), Path(configured) / "rsna2024"]
    else:
        candidates = [Path(__file__).resolve().parents[2] / "shared" / "real" / "rsna2024"]
    for candidate in candidates:
        if (candidate / "train_label_coordinates.csv").is_file():
            return candidate
    pytest.skip("the real competition CSVs are not available (set RSNA_REAL_DIR)")


def test_real_row_ids_follow_the_sample_submission():
    real = real_competition_dir()
    rows, _ = P.read_split_rows(real, "train", coordinates=None)
    sample = pd.read_csv(real / "sample_submission.csv")
    assert sample["row_id"].str.fullmatch(row_id_pattern()).all()
    assert rows["row_id"].str.fullmatch(row_id_pattern()).all() and rows["row_id"].is_unique
    test, _ = P.read_split_rows(real, "test", coordinates=None)
    assert sorted(test["row_id"]) == sorted(sample["row_id"])


def test_real_class_counts_equal_label_counts_of_rows_with_a_coordinate():
    real = real_competition_dir()
    labels = pd.read_csv(real / "train.csv")
    coordinates = pd.read_csv(real / "train_label_coordinates.csv")
    rows, skipped = P.read_split_rows(real, "train", coordinates=None)
    # Count independently of the code under test, one cell at a time.
    located = {
        (study_id, f"{condition.lower().replace(' ', '_')}_{level.lower().replace('/', '_')}")
        for study_id, condition, level in coordinates[["study_id", "condition", "level"]].itertuples(index=False)
    }
    counts = Counter(
        value
        for record in labels.to_dict("records")
        for column, value in record.items()
        if column != "study_id" and isinstance(value, str) and (record["study_id"], column) in located
    )
    assert rows[list(P.CLASS_NAMES)].sum().tolist() == [counts[name] for name in P.SEVERITY_NAMES]
    assert (rows[list(P.CLASS_NAMES)].sum(axis=1) == 1).all()
    assert skipped["blank_label"] == labels.isna().sum().sum()
    assert len(rows) + skipped["blank_label"] + skipped["without_coordinate"] == len(labels) * 25


FAULTY_SERIES = {}  # {series folder: "dies" or "stalls"}, read by faulty_crop_series in the forked workers.


def faulty_crop_series(task, *arguments):
    """crop_series, except for the series in FAULTY_SERIES: exits at once, as an out-of-memory kill would end the
    worker, or stalls."""
    fault = FAULTY_SERIES.get(task.series_dir)
    if fault == "dies":
        os._exit(1)
    if fault == "stalls":
        P.time.sleep(30)
    return CROP_SERIES(task, *arguments)


CROP_SERIES = P.crop_series


@pytest.mark.parametrize(
    "fault, expected",
    [("dies", "a worker process died"), ("stalls", "a worker process has not finished one task in 1 s")],
)
def test_a_worker_process_that_dies_or_stalls_is_named_and_nothing_half_written_is_kept(
    fault, expected, competition, tmp_path, monkeypatch, capsys
):
    """prepare decodes in forked worker processes: one that dies or stalls ends the run with exit code 2 and the
    series it may have been reading, never a hang or a traceback, and every crop on disk is a whole PNG."""
    if "fork" not in P.multiprocessing.get_all_start_methods():
        pytest.skip("worker processes are forked; this system cannot fork")
    first = sorted((competition.root / "train_images").glob("*/*"))[0]
    monkeypatch.setitem(FAULTY_SERIES, first, fault)
    monkeypatch.setattr(P, "crop_series", faulty_crop_series)
    monkeypatch.setattr(P, "WORKER_STALL_SECONDS", 1)
    out_dir = tmp_path / "out"
    argv = ["prepare", "--competition-dir", str(competition.root), "--out-dir", str(out_dir), "--workers", "2"]
    assert P.main(argv) == 2
    message = capsys.readouterr().err
    assert message.startswith(f"error: {expected}") and "--workers 1" in message and message.count("\n") == 1
    assert all(cv2.imread(str(path)) is not None for path in out_dir.rglob("*.png"))


def test_worker_processes_find_the_jobs_when_the_script_runs_under_a_profiler(competition, prepared, tmp_path):
    """Under `python -m cProfile script.py`, __main__ is the profiler's module: the forked workers must still be sent
    the crop jobs (pickled by name), and cut the same crops."""
    out_dir = tmp_path / "seed"
    command = [sys.executable, "-m", "cProfile", "-o", os.devnull, str(Path(P.__file__)), "prepare"]
    command += ["--competition-dir", str(competition.root), "--out-dir", str(out_dir), "--split", "train"]
    command += ["--workers", "2", "--crop-mm", str(CROP_MM), "--crop-pixels", str(CROP_PIXELS)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert len(pd.read_csv(out_dir / "train.csv")) == len(prepared[2])
