"""Tests for the anatomical synthetic competition: layout, DICOM geometry, truth and severity signal."""

import subprocess
import sys

import anatomy_synthetic as A
import numpy as np
import pandas as pd
import pydicom
import pytest
from conftest import script as P

# Six train studies hold every kind the generator cycles through (both orders, both axial
# layouts, a missing series, two axial series); 128 px keeps them fast.
TRAIN_STUDIES, TEST_STUDIES, IMAGE_SIZE = 6, 2, 128


@pytest.fixture(scope="module")
def competition(tmp_path_factory):
    """Six train and two test studies at 128 px; seed 3 draws every grade of every condition."""
    return A.write_anatomical_competition(
        tmp_path_factory.mktemp("anatomy"), TRAIN_STUDIES, TEST_STUDIES, seed=3, image_size=IMAGE_SIZE
    )


@pytest.fixture(scope="module")
def headers(competition):
    """(study_id, series_id, instance_number) -> DICOM header, for every file written."""
    found = {}
    for path in competition.root.glob("*_images/*/*/*.dcm"):
        key = (int(path.parts[-3]), int(path.parts[-2]), int(path.stem))
        found[key] = pydicom.dcmread(path, stop_before_pixels=True)
    return found


def geometry(header):
    """(ImagePositionPatient, row direction, column direction, unit normal, (row, column) spacing) of a header."""
    position = np.array(header.ImagePositionPatient, dtype=float)
    orientation = np.array(header.ImageOrientationPatient, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    spacing = np.array(header.PixelSpacing, dtype=float)
    return position, orientation[:3], orientation[3:], normal / np.linalg.norm(normal), spacing


def pixel_to_world(header, x, y):
    """P = IPP + x * column spacing * r + y * row spacing * c, from the tags alone."""
    position, r, c, _, (row_spacing, column_spacing) = geometry(header)
    return position + x * column_spacing * r + y * row_spacing * c


def all_coordinates(competition):
    """Train coordinates (with label noise) and the test truth (without), as written."""
    train = pd.read_csv(competition.root / "train_label_coordinates.csv").assign(noisy=True)
    test = pd.read_csv(competition.root / "_truth" / "test_label_coordinates.csv").assign(noisy=False)
    return pd.concat([train, test], ignore_index=True)


def label_column(condition, level):
    """train.csv's column for a coordinate row's 'Spinal Canal Stenosis' and 'L1/L2'."""
    return f"{condition}_{level}".lower().replace(" ", "_").replace("/", "_")


def test_layout_and_csv_columns(competition):
    root = competition.root
    train = pd.read_csv(root / "train.csv")
    assert list(train.columns) == ["study_id", *P.WIDE_LABEL_COLUMNS]
    assert set(train.iloc[:, 1:].to_numpy().ravel()) <= set(P.SEVERITY_NAMES)
    assert train["study_id"].tolist() == competition.train_study_ids
    for split, ids in (("train", competition.train_study_ids), ("test", competition.test_study_ids)):
        descriptions = pd.read_csv(root / f"{split}_series_descriptions.csv")
        assert list(descriptions.columns) == ["study_id", "series_id", "series_description"]
        assert set(descriptions["series_description"]) == {"Sagittal T1", "Sagittal T2/STIR", "Axial T2"}
        assert sorted(descriptions["study_id"].unique()) == ids
        for study_id, series_id in zip(descriptions["study_id"], descriptions["series_id"]):
            series_dir = root / f"{split}_images" / str(study_id) / str(series_id)
            instances = sorted(int(path.stem) for path in series_dir.glob("*.dcm"))
            assert instances == list(range(instances[0], instances[0] + len(instances)))  # Consecutive.
    coordinates = pd.read_csv(root / "train_label_coordinates.csv")
    assert list(coordinates.columns) == ["study_id", "series_id", "instance_number", "condition", "level", "x", "y"]
    assert set(coordinates["condition"]) == {name.replace("_", " ").title() for name in P.CONDITIONS}
    assert set(coordinates["level"]) == {"L1/L2", "L2/L3", "L3/L4", "L4/L5", "L5/S1"}
    assert not set(coordinates["study_id"]) & set(competition.test_study_ids)
    submission = pd.read_csv(root / "sample_submission.csv")
    assert list(submission.columns) == ["row_id", "normal_mild", "moderate", "severe"]
    assert len(submission) == 25 * TEST_STUDIES
    assert submission["row_id"].iloc[0] == f"{competition.test_study_ids[0]}_spinal_canal_stenosis_l1_l2"
    truth = pd.read_csv(root / "_truth" / "test_labels.csv")
    assert truth.equals(competition.test_labels) and list(truth.columns) == list(train.columns)
    truth_coordinates = pd.read_csv(root / "_truth" / "test_label_coordinates.csv")
    assert list(truth_coordinates.columns) == list(coordinates.columns)
    assert len(truth_coordinates) == len(competition.test_coordinates)
    # The project's own readers accept the files.
    assert len(P.read_coordinates(root / "train_label_coordinates.csv")) == len(coordinates)
    assert len(P.read_labels(root / "train.csv")) == 25 * TRAIN_STUDIES


def test_labels_sit_on_their_series(competition):
    coordinates = pd.read_csv(competition.root / "train_label_coordinates.csv")
    descriptions = pd.read_csv(competition.root / "train_series_descriptions.csv")
    merged = coordinates.merge(descriptions, on=["study_id", "series_id"])
    assert len(merged) == len(coordinates)
    expected = {
        "Spinal Canal Stenosis": "Sagittal T2/STIR",
        "Left Neural Foraminal Narrowing": "Sagittal T1",
        "Right Neural Foraminal Narrowing": "Sagittal T1",
        "Left Subarticular Stenosis": "Axial T2",
        "Right Subarticular Stenosis": "Axial T2",
    }
    assert (merged["condition"].map(expected) == merged["series_description"]).all()


def test_dicom_tags(competition, headers):
    required = (
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "PixelSpacing",
        "InstanceNumber",
        "Rows",
        "Columns",
        "SeriesDescription",
        "RescaleSlope",
        "RescaleIntercept",
        "SeriesInstanceUID",
        "SOPInstanceUID",
    )
    for header in headers.values():
        assert all(name in header for name in required)
        assert header.PhotometricInterpretation == "MONOCHROME2"
        assert header.SOPClassUID == pydicom.uid.MRImageStorage
    test_ids = set(competition.test_study_ids)
    with_thickness = {key[:2] for key, header in headers.items() if "SliceThickness" in header}
    assert with_thickness and not {study for study, _ in with_thickness} & test_ids
    assert {key[:2] for key in headers} - with_thickness  # Some train series lack it too.
    syntaxes = {header.file_meta.TransferSyntaxUID for header in headers.values()}
    assert syntaxes == {pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.RLELossless}
    rle = next(key for key, header in headers.items() if header.file_meta.TransferSyntaxUID == pydicom.uid.RLELossless)
    split = "test" if rle[0] in test_ids else "train"
    path = competition.root / f"{split}_images" / str(rle[0]) / str(rle[1]) / f"{rle[2]}.dcm"
    pixels = pydicom.dcmread(path).pixel_array
    assert pixels.shape == (IMAGE_SIZE, IMAGE_SIZE) and pixels.std() > 0


def series_positions(headers, study_id, series_id):
    """(instance numbers, slice centres) of one series, by instance number."""
    keys = sorted(key for key in headers if key[:2] == (study_id, series_id))
    centres = [
        pixel_to_world(headers[key], (headers[key].Columns - 1) / 2, (headers[key].Rows - 1) / 2) for key in keys
    ]
    return [key[2] for key in keys], np.array(centres)


def test_instance_orders_layouts_and_missing_series(competition, headers):
    series = competition.series
    seen = set()
    for row in series.itertuples():
        _, centres = series_positions(headers, row.study_id, row.series_id)
        axis = 2 if row.description == "Axial T2" else 0  # Axial along +z, sagittal along +x.
        steps = np.diff(centres[:, axis])
        # Per-level blocks step back at block boundaries only if numbered against their direction.
        if row.layout == "contiguous":
            assert (steps > 0).all() if row.order == "ascending" else (steps < 0).all()
        else:
            assert np.sign(centres[-1, axis] - centres[0, axis]) == (1 if row.order == "ascending" else -1)
        assert len(centres) == row.slices
        seen.add((row.description, row.order))
    train = series[series["split"] == "train"]
    assert {(kind, order) for kind in A.DESCRIPTIONS for order in ("ascending", "descending")} <= seen
    blocks = train[train["layout"] == "per-level blocks"]
    assert len(blocks) and (train["layout"] == "contiguous").any()
    for row in blocks.itertuples():
        orientations = {
            tuple(header.ImageOrientationPatient)
            for key, header in headers.items()
            if key[:2] == (row.study_id, row.series_id)
        }
        assert len(orientations) >= 2
    axial_counts = train[train["description"] == "Axial T2"].groupby("study_id").size()
    assert axial_counts.max() == 2
    kinds = train.groupby("study_id")["description"].nunique()
    lacking = kinds[kinds < 3].index
    assert len(lacking) >= 1
    coordinates = pd.read_csv(competition.root / "train_label_coordinates.csv")
    for study_id in lacking:
        present = set(train.loc[train["study_id"] == study_id, "description"])
        labelled = set(
            coordinates.loc[coordinates["study_id"] == study_id, "condition"].map(
                lambda name: A.LABEL_SERIES[name.lower().replace(" ", "_")]
            )
        )
        assert labelled == present


def test_truth_points_match_the_phantom(competition, headers):
    """Every written point maps back, through the tags pydicom reads, to the phantom's own point."""
    points = competition.points.set_index("row_id")
    coordinates = all_coordinates(competition)
    assert len(coordinates) == points["series_id"].notna().sum()
    for row in coordinates.itertuples():
        row_id = f"{row.study_id}_{label_column(row.condition, row.level)}"
        truth = points.loc[row_id, ["world_x", "world_y", "world_z"]].to_numpy(dtype=float)
        header = headers[(row.study_id, row.series_id, row.instance_number)]
        position, _, _, normal, _ = geometry(header)
        labelled = pixel_to_world(header, row.x, row.y)
        in_plane = (labelled - truth) - ((labelled - truth) @ normal) * normal
        off_plane = abs((truth - position) @ normal)
        assert np.linalg.norm(in_plane) <= (1.5 + 1e-3 if row.noisy else 1e-3)
        assert np.linalg.norm(in_plane) >= (0.5 - 1e-3 if row.noisy else 0.0)
        # The nearest slice lies at most half a slice spacing away.
        spacing = competition.series.set_index("series_id").loc[row.series_id, "slice_spacing"]
        assert off_plane <= spacing / 2 + 0.05
        # The labelled instance is the one nearest the point along the slice normal, among all
        # slices of that kind in the study, not merely the middle instance number.
        kind = header.SeriesDescription
        candidates = [
            key for key, other in headers.items() if key[0] == row.study_id and other.SeriesDescription == kind
        ]
        distances = {key: abs((truth - geometry(headers[key])[0]) @ geometry(headers[key])[3]) for key in candidates}
        assert min(distances, key=distances.get) == (row.study_id, row.series_id, row.instance_number)


def test_images_agree_with_their_tags(competition, headers):
    """The stored pixels are the phantom sampled where the tags say each pixel is."""
    for row in competition.series.itertuples():
        keys = sorted(key for key in headers if key[:2] == (row.study_id, row.series_id))
        key = keys[len(keys) // 2]
        path = competition.root / f"{row.split}_images" / str(key[0]) / str(key[1]) / f"{key[2]}.dcm"
        dataset = pydicom.dcmread(path)
        pixels = pydicom.pixels.apply_modality_lut(dataset.pixel_array, dataset).astype(float)
        columns, rows = np.meshgrid(np.arange(dataset.Columns), np.arange(dataset.Rows))
        world = pixel_to_world(dataset, columns[..., None], rows[..., None])
        sequence = "T1" if row.description == "Sagittal T1" else "T2"
        phantom = competition.phantoms[row.study_id]
        if row.description == "Sagittal T2/STIR" and phantom.stir:
            sequence = "STIR"
        expected = phantom.signal(world[..., 0], world[..., 1], world[..., 2], sequence)
        assert np.corrcoef(expected.ravel(), pixels.ravel())[0, 1] > 0.9
        # Transposed or mirrored tags would not match.
        assert (
            np.corrcoef(
                expected.T.ravel() if expected.shape[0] == expected.shape[1] else expected[::-1].ravel(), pixels.ravel()
            )[0, 1]
            < 0.8
        )


CROP_GRID = np.meshgrid(np.linspace(-24, 24, 97), np.linspace(-24, 24, 97))  # 48 mm at 0.5 mm.


def crop_signal(phantom, condition, level, sequence, severities):
    """A 48 mm square of the noise-free phantom in the plane its label is drawn on, around the point."""
    phantom = phantom.with_severities(severities)
    point = phantom.label_point(condition, level)
    if A.LABEL_SERIES[condition] == "Axial T2":
        k = len(P.LEVELS) - 1 - P.LEVELS.index(level)
        across, down = np.array([1.0, 0.0, 0.0]), np.cross(phantom.tangent(phantom.disc_centres[k]), [1.0, 0.0, 0.0])
    else:
        across, down = np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, -1.0])
    u, v = CROP_GRID
    world = point + u[..., None] * across + v[..., None] * down
    return phantom.signal(world[..., 0], world[..., 1], world[..., 2], sequence)


@pytest.mark.parametrize("condition", P.CONDITIONS)
def test_severity_changes_only_its_own_level_and_side(competition, condition):
    phantom = competition.phantoms[competition.train_study_ids[0]]
    sequence = "T1" if "foraminal" in condition else "T2"
    row = P.CONDITIONS.index(condition)
    normal = np.zeros((len(P.CONDITIONS), len(P.LEVELS)), dtype=int)
    central = CROP_GRID[0] ** 2 + CROP_GRID[1] ** 2 <= 12.0**2
    changed = []
    for grade in range(3):
        severities = normal.copy()
        severities[row, 2] = grade  # L3/L4.
        changes = [
            crop_signal(phantom, condition, level, sequence, severities)
            != crop_signal(phantom, condition, level, sequence, normal)
            for level in P.LEVELS
        ]
        changed.append([change.mean() for change in changes])
        # The middle of every other level's crop is untouched; only a corner may reach this disc.
        assert not any(change[central].any() for index, change in enumerate(changes) if index != 2)
    changed = np.array(changed)
    assert changed[0].max() == 0
    # Each grade changes more of its crop than the one below, and far more than of any other level's.
    assert 0.005 < changed[1, 2] < changed[2, 2]
    assert changed[:, [0, 1, 3, 4]].max() < 0.25 * changed[1, 2]
    # A sided grade leaves the other side's point alone (an axial crop holds both recesses).
    if condition.startswith(("left", "right")):
        other = condition.replace("left", "RIGHT").replace("right", "left").replace("RIGHT", "right")
        severities = normal.copy()
        severities[row, 2] = 2
        around = CROP_GRID[0] ** 2 + CROP_GRID[1] ** 2 <= 4.0**2
        assert np.array_equal(
            crop_signal(phantom, other, "l3_l4", sequence, severities)[around],
            crop_signal(phantom, other, "l3_l4", sequence, normal)[around],
        )


def test_severity_darkens_the_written_point(competition):
    """In the files, the 2 mm around a Severe point are darker than around a Normal/Mild one, on average."""
    coordinates = pd.read_csv(competition.root / "train_label_coordinates.csv")
    labels = competition.train_labels.set_index("study_id")
    brightness = {}  # (condition without its side, grade) -> windowed means near the point, 0..1.
    for row in coordinates.itertuples():
        column = label_column(row.condition, row.level)
        path = competition.root / "train_images" / str(row.study_id) / str(row.series_id) / f"{row.instance_number}.dcm"
        dataset = pydicom.dcmread(path)
        pixels = pydicom.pixels.apply_modality_lut(dataset.pixel_array, dataset).astype(float)
        low, high = np.percentile(pixels, (1, 99.5))
        rows, columns = np.ogrid[: pixels.shape[0], : pixels.shape[1]]
        near = (columns - row.x) ** 2 + (rows - row.y) ** 2 <= (2.0 / float(dataset.PixelSpacing[0])) ** 2
        key = (column.split("_l")[0].removeprefix("left_").removeprefix("right_"), labels.loc[row.study_id, column])
        brightness.setdefault(key, []).append((pixels[near].mean() - low) / (high - low))
    for condition in ("spinal_canal_stenosis", "neural_foraminal_narrowing", "subarticular_stenosis"):
        assert np.mean(brightness[condition, "Severe"]) < np.mean(brightness[condition, "Normal/Mild"]) - 0.15


def test_same_arguments_same_bytes(tmp_path):
    """The API and the command line, serial and in parallel, write the same files for the same arguments."""
    first = A.write_anatomical_competition(tmp_path / "first", 2, 1, seed=5, image_size=48)
    # A fresh process, as a command-line user runs it.
    subprocess.run(
        [
            sys.executable,
            A.__file__,
            "--out",
            str(tmp_path / "second"),
            "--train-studies",
            "2",
            "--test-studies",
            "1",
            "--seed",
            "5",
            "--image-size",
            "48",
            "--workers",
            "2",
        ],
        check=True,
        capture_output=True,
    )
    files = sorted(path.relative_to(first.root) for path in first.root.rglob("*") if path.is_file())
    second = tmp_path / "second"
    assert len(files) > 100
    assert sorted(path.relative_to(second) for path in second.rglob("*") if path.is_file()) == files
    for path in files:
        assert (first.root / path).read_bytes() == (second / path).read_bytes(), path
    with pytest.raises(FileExistsError):
        A.write_anatomical_competition(tmp_path / "first", 2, 1)
