"""Small synthetic DICOM studies in the RSNA 2024 competition layout, for testing the prepare step.

Every slice has a flat background whose brightness grows with the instance number (so a crop's
channel order can be checked), a bright band and a dark band at the right edge (so each series'
percentile window has fixed ends), and, on a labelled instance, a bright Gaussian marker centred
exactly on each labelled (x, y). The three series kinds differ in photometric interpretation,
pixel spacing, rescale slope and transfer syntax, like real studies do.
"""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, RLELossless, generate_uid

from script import CONDITIONS, LEVELS, SEVERITY_NAMES, WIDE_LABEL_COLUMNS

INSTANCES_PER_SERIES = 7
MARKER_VALUE = 5000.0  # Far above the bright band, so the marker saturates the window.
BRIGHT_BAND_VALUE = 2500.0  # Sets the series' upper percentile.
MONOCHROME1_CEILING = 8000.0  # MONOCHROME1 slices store this minus the displayed value.


@dataclass(frozen=True)
class SeriesKind:
    """How one of a study's three series looks and which conditions are labelled on it."""

    description: str
    conditions: tuple
    photometric_interpretation: str
    pixel_spacing: tuple  # (row spacing, column spacing) in millimetres.
    shape: tuple  # (rows, columns).
    transfer_syntax: str


SERIES_KINDS = (
    SeriesKind("Sagittal T2/STIR", CONDITIONS[:1], "MONOCHROME2", (0.5, 0.5), (160, 128), ExplicitVRLittleEndian),
    SeriesKind("Sagittal T1", CONDITIONS[1:3], "MONOCHROME1", (0.8, 0.6), (128, 144), ExplicitVRLittleEndian),
    SeriesKind("Axial T2", CONDITIONS[3:], "MONOCHROME2", (0.4, 0.4), (128, 128), RLELossless),
)


@dataclass
class SyntheticCompetition:
    """Where the synthetic competition was written and what a correct prepare step must find."""

    root: Path
    series_kinds: dict = field(default_factory=dict)  # series_id -> SeriesKind
    row_instances: dict = field(default_factory=dict)  # row_id -> (series_id, labelled instance number)
    blank_row_ids: set = field(default_factory=set)
    uncoordinated_row_ids: set = field(default_factory=set)
    unreadable_row_ids: set = field(default_factory=set)  # Missing series, missing instance or corrupt file.
    missing_paths: list = field(default_factory=list)
    corrupt_paths: list = field(default_factory=list)
    test_study_ids: list = field(default_factory=list)
    test_coordinates_path: Path = None


def label_point(kind_index, condition, level_index):
    """The labelled instance and (x, y) of one condition and level on one series kind.

    Points on one slice are far enough apart that a 12 mm crop holds only its own marker, and
    some lie near an image edge so that their crops need padding.
    """
    is_left = condition.startswith("left")
    if kind_index == 0:  # Sagittal T2: every level on the middle slice, L5/S1 near the bottom edge.
        return 4, 50.0 + 2.3 * level_index, 22.4 + 32.5 * level_index
    if kind_index == 1:  # Sagittal T1: left on the first slice, right on the last; L1/L2 near a corner.
        instance_number = 1 if is_left else INSTANCES_PER_SERIES
        return instance_number, 6.5 + 10.0 * level_index + (0.0 if is_left else 14.0), 5.3 + 28.0 * level_index
    # Axial T2: one slice per level, with left and right side by side.
    return (1, 2, 4, 6, 7)[level_index], (40.6 if is_left else 88.2), 24.5 + 20.0 * level_index


def displayed_slice(kind, instance_number, markers, rng):
    """The picture a viewer should show for one slice, as float values."""
    rows, columns = kind.shape
    image = 400.0 + 120.0 * instance_number + rng.normal(0.0, 20.0, size=kind.shape)
    # The band brightens a little with the instance number, so a series' window depends on
    # which of its slices were read.
    image[:, columns - 16 : columns - 8] = BRIGHT_BAND_VALUE + 50.0 * instance_number
    image[:, columns - 8 :] = 0.0
    row_grid, column_grid = np.mgrid[0:rows, 0:columns]
    for x, y in markers:
        image += MARKER_VALUE * np.exp(-((column_grid - x) ** 2 + (row_grid - y) ** 2) / (2 * 1.2**2))
    return image


def write_dicom(path, kind, study_id, series_id, instance_number, displayed):
    """Store a displayed picture as a DICOM file the way the series kind prescribes."""
    # Odd instances of the Sagittal T1 series store half values with slope 2, as some scanners
    # do per slice, so a reader that ignores the rescale sees mismatched neighbours.
    slope = 2.0 if kind.description == "Sagittal T1" and instance_number % 2 else 1.0
    modality_values = MONOCHROME1_CEILING - displayed if kind.photometric_interpretation == "MONOCHROME1" else displayed
    stored = np.clip(np.round(modality_values / slope), 0, 65535).astype(np.uint16)

    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.MediaStorageSOPClassUID = MRImageStorage
    dataset.SOPClassUID = MRImageStorage
    dataset.Modality = "MR"
    dataset.StudyInstanceUID = generate_uid(entropy_srcs=[str(study_id)])
    dataset.SeriesInstanceUID = generate_uid(entropy_srcs=[str(series_id)])
    dataset.SeriesDescription = kind.description
    dataset.InstanceNumber = instance_number
    dataset.PixelSpacing = list(kind.pixel_spacing)
    dataset.RescaleSlope = slope
    dataset.RescaleIntercept = 0.0
    dataset.set_pixel_data(stored, kind.photometric_interpretation, bits_stored=16)
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    if kind.transfer_syntax != ExplicitVRLittleEndian:
        dataset.compress(kind.transfer_syntax)
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(path, enforce_file_format=True)


def write_study(images_dir, study_id, rng):
    """Write one study's three series; returns its coordinate rows and each series' kind."""
    coordinates, series_kinds = [], {}
    for kind_index, kind in enumerate(SERIES_KINDS):
        series_id = study_id * 10 + kind_index
        series_kinds[series_id] = kind
        points = [
            (condition, level, *label_point(kind_index, condition, level_index))
            for condition in kind.conditions
            for level_index, level in enumerate(LEVELS)
        ]
        for instance_number in range(1, INSTANCES_PER_SERIES + 1):
            markers = [(x, y) for _, _, labelled, x, y in points if labelled == instance_number]
            displayed = displayed_slice(kind, instance_number, markers, rng)
            path = images_dir / str(study_id) / str(series_id) / f"{instance_number}.dcm"
            write_dicom(path, kind, study_id, series_id, instance_number, displayed)
        coordinates += [
            {
                "row_id": row_id(study_id, condition, level),
                "study_id": study_id,
                "series_id": series_id,
                "instance_number": instance_number,
                "condition": condition.replace("_", " ").title(),
                "level": level.upper().replace("_", "/"),
                "x": x,
                "y": y,
            }
            for condition, level, instance_number, x, y in points
        ]
    return coordinates, series_kinds


def row_id(study_id, condition, level):
    """The submission row_id of one study, condition and level."""
    return f"{study_id}_{condition}_{level}"


def series_descriptions(study_ids):
    """The series_descriptions table of some studies."""
    rows = [
        (study_id, study_id * 10 + index, kind.description)
        for study_id in study_ids
        for index, kind in enumerate(SERIES_KINDS)
    ]
    return pd.DataFrame(rows, columns=["study_id", "series_id", "series_description"])


def write_studies(images_dir, study_ids, competition, rng):
    """Write several studies; returns their coordinates in the competition's spelling, by row_id."""
    coordinates = []
    for study_id in study_ids:
        study_coordinates, series_kinds = write_study(images_dir, study_id, rng)
        coordinates += study_coordinates
        competition.series_kinds.update(series_kinds)
    return pd.DataFrame(coordinates).set_index("row_id")


def random_labels(study_ids, rng):
    """A train.csv table with random severities."""
    severities = rng.choice(SEVERITY_NAMES, size=(len(study_ids), len(WIDE_LABEL_COLUMNS)))
    labels = pd.DataFrame(severities, columns=list(WIDE_LABEL_COLUMNS))
    labels.insert(0, "study_id", study_ids)
    return labels.astype(object)


def break_files(images_dir, study_ids, competition):
    """Delete an instance file and a series folder and truncate two files; note the lost rows.

    Of the truncated files, instance 2 is labelled, so its rows are lost, while instance 5 is
    only a neighbour of labelled instances, so their crops must reuse the labelled slice.
    """
    missing_instance = (study_ids[1] * 10 + 2, 6)
    missing_series = study_ids[2] * 10 + 1
    corrupt_series = study_ids[2] * 10 + 2
    missing_instance_path = images_dir / str(study_ids[1]) / str(missing_instance[0]) / f"{missing_instance[1]}.dcm"
    missing_series_path = images_dir / str(study_ids[2]) / str(missing_series)

    missing_instance_path.unlink()
    for path in missing_series_path.iterdir():
        path.unlink()
    missing_series_path.rmdir()
    for instance_number in (2, 5):
        corrupt = images_dir / str(study_ids[2]) / str(corrupt_series) / f"{instance_number}.dcm"
        corrupt.write_bytes(corrupt.read_bytes()[: corrupt.stat().st_size // 2])
        competition.corrupt_paths.append(corrupt)

    competition.missing_paths += [missing_instance_path, missing_series_path]
    competition.unreadable_row_ids = {
        row
        for row, (series_id, instance_number) in competition.row_instances.items()
        if series_id == missing_series or (series_id, instance_number) in (missing_instance, (corrupt_series, 2))
    }


def write_synthetic_competition(root, train_studies=3, test_studies=2, seed=0):
    """Write train and test studies plus the competition CSVs under root.

    Train study 0 has two blank labels and a duplicate coordinate, study 1 a label without a
    coordinate and a missing instance file, study 2 two corrupt files and a missing series folder.
    Test coordinates (in test_coordinates.csv) cover only the sagittal series.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    competition = SyntheticCompetition(root)
    train_ids = [1000 + index for index in range(train_studies)]
    competition.test_study_ids = [9000 + index for index in range(test_studies)]
    competition.test_coordinates_path = root / "test_coordinates.csv"

    coordinates = write_studies(root / "train_images", train_ids, competition, rng)
    labelled_instances = zip(coordinates["series_id"], coordinates["instance_number"])
    competition.row_instances = dict(zip(coordinates.index, labelled_instances))
    break_files(root / "train_images", train_ids, competition)

    labels = random_labels(train_ids, rng)
    for condition, level in (("spinal_canal_stenosis", "l1_l2"), ("left_subarticular_stenosis", "l5_s1")):
        labels.loc[0, f"{condition}_{level}"] = None
        competition.blank_row_ids.add(row_id(train_ids[0], condition, level))
    competition.uncoordinated_row_ids.add(row_id(train_ids[1], "right_subarticular_stenosis", "l5_s1"))
    # A second point on the next instance, listed first: the prepare step must still pick the
    # lower instance, the one that carries the marker.
    duplicate = coordinates.loc[[row_id(train_ids[0], "spinal_canal_stenosis", "l3_l4")]].assign(instance_number=5)
    coordinates = pd.concat([duplicate, coordinates.drop(index=list(competition.uncoordinated_row_ids))])

    test_coordinates = write_studies(root / "test_images", competition.test_study_ids, competition, rng)
    test_coordinates = test_coordinates[test_coordinates["series_id"] % 10 != 2]

    labels.to_csv(root / "train.csv", index=False)
    coordinates.to_csv(root / "train_label_coordinates.csv", index=False)
    series_descriptions(train_ids).to_csv(root / "train_series_descriptions.csv", index=False)
    series_descriptions(competition.test_study_ids).to_csv(root / "test_series_descriptions.csv", index=False)
    test_coordinates.to_csv(competition.test_coordinates_path, index=False)
    return competition
