"""A competition-layout folder built from real lumbar MR: 30 volumes with their five disc-level points.

For measuring the level localiser on real anatomy: otherwise it is only measured on synthetic phantoms, and on
real MR it loses count. The data are `vb3_shared30.npz` (see the README beside it): 30 healthy volunteers, water
images of a chemical-shift (water–fat) scan, 1 mm isotropic, uint8 (30, 224, 224, 77), axis 0 superior → inferior,
axis 1 anterior → posterior, axis 2 across the body; `points` (30, 5, 3) hold the centres of the discs L1/L2 to L5/S1
as (row, column, slice) voxel coordinates. The data are never copied into the repository: they are read from
SPINE_MR_DIR, else `<repository>/../shared/real/spine_mr` (where CI has them), and whoever needs them skips cleanly
without them. This writes, for chosen subjects, the same layout as tests/anatomy_synthetic.py:

    ROOT/train.csv                        study_id + 25 {condition}_{level}: spinal canal "Normal/Mild", the rest blank
    ROOT/train_series_descriptions.csv    study_id, series_id, series_description (one Sagittal T2/STIR per study)
    ROOT/train_label_coordinates.csv      study_id, series_id, instance_number, condition, level, x, y
    ROOT/test_series_descriptions.csv
    ROOT/sample_submission.csv            row_id, normal_mild, moderate, severe (test studies)
    ROOT/train_images/{study_id}/{series_id}/{instance_number}.dcm, ROOT/test_images/... likewise
    ROOT/_truth/test_label_coordinates.csv  the test studies' points, plus world_x, world_y, world_z (mm) and more
    ROOT/_truth/test_labels.csv           train.csv's format, for the test studies

Choices, on purpose
-------------------
- **Series: Sagittal T2/STIR only.** The volumes are one contrast, and the points are the disc levels of the spinal
  canal condition, labelled on that series in the competition. A water image of a water–fat scan is fat-suppressed
  with bright CSF and bright healthy discs, so it looks like a STIR/T2 sagittal, not like a T1 or an axial series;
  the foramina and recesses have no labels here. Every study gets only the spinal canal levels: "Normal/Mild" in
  train.csv (healthy volunteers), the other 20 columns blank, and no Sagittal T1 or Axial T2 series.
- **Slices: slabs 3.5–4.5 mm thick and apart, averaged from the 1 mm volume.** The competition's sagittal series are
  3–4.5 mm apart with 15–20 slices, and a point seldom sits on a slice's centre. Each subject draws its spacing s
  (uniform 3.5–4.5 mm) and a phase (uniform 0–s mm) where its first slab starts; slab j averages the volume (linearly
  interpolated across the body) over [start + j·s, start + (j + 1)·s], contiguous like an MR slice profile without
  a gap; the slabs fill the 77 mm across the body: 16–21 slices. So a point lies anywhere from 0 to s/2 off its
  slice's centre, as in the competition, and its neighbours are a real partial-volume mix.
- **Pixels: the 224 × 224 grid of 1 mm resampled to 288, 300 or 320 pixels (0.78, 0.75 or 0.70 mm)**, one drawn per
  subject, with cv2.resize's bilinear interpolation (INTER_LINEAR: pixel centre x of the new grid lies at
  (x + 0.5)·Δ − 0.5 of the old one, which the geometry below follows exactly). Real sagittal pixels are 0.5–0.9 mm,
  and sizes differ from study to study. The field of view stays 224 mm: head at the top, anterior on the left.
- **Geometry, LPS mm** (+x the patient's left, +y posterior, +z the head): voxel (row, column, slice k) lies at
  origin + (k, column, −row), the origin shifted per subject by up to ±20 mm (the table position). Which end of
  axis 2 is the patient's left is not recorded in the source; it is taken as +x (the canal levels do not care).
  ImageOrientationPatient is r = (0, 1, 0) (along a row, increasing column index: anterior → posterior) and
  c = (0, 0, −1) (down a column, increasing row index: superior → inferior); their normal r × c points to the
  patient's right. ImagePositionPatient is the world point of pixel (0, 0)'s centre on its slab's centre plane;
  PixelSpacing is (Δ, Δ). Instance numbers run 1.. along +x for even subjects and along −x for odd ones (the
  competition has both), and name the files. No SliceThickness or SpacingBetweenSlices tag (the hidden test has
  none). A label point goes on the slice whose centre plane is nearest to it along the normal, at its in-plane pixel
  position there (computed from the tags as written, read back), so the stated geometry and the pixels agree.
- **Points: the disc centres, as they are.** The competition's spinal canal points lie in the canal behind the disc,
  about 15–25 mm posterior of these; here the localiser learns and is measured on disc centres, a consistent
  convention within this data set. Counting levels (which disc a level lands on) is the same question either way.
  The points carry their own 1–3 mm definition noise (more at L5/S1, which is often 5–10 mm off the midline of the
  others); subject index 29 has a marked scoliosis (its levels span 48 mm across the body, over 12 slices).
- **Intensities**: stored as 12-bit values (the 8-bit image times a per-subject gain of 4–12); the reader windows per
  series anyway.

Other contrast (`--contrast`)
-----------------------------
How the localiser does on "T2 volumes from another scanner" is the question; we have none. `--contrast inverted`
is a simulated proxy, not a second scanner: inside the body (a mask of the blurred slab) the intensities are
inverted, air stays dark; CSF and discs turn dark and fat bright, roughly a T1 look, which a localiser trained on
the water contrast has never seen. `--contrast gamma` applies a gamma of 2.5, keeping only the brightest tissue
(CSF, nuclei) bright. Neither is another scanner's noise, resolution or artefacts; both only say how much the
localiser leans on the training contrast.

From the command line:

    python tests/real_mr_competition.py --out DIR --train 0-23 --test 24-29 [--seed N] [--contrast inverted]

Subjects are indices 0-29 into the npz, as ranges and lists ("0-5,8,10-12"). The same arguments always write the
same files, and a subject's images depend only on the seed and its index, not on the split it is in.
"""

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import MRImageStorage, generate_uid

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

# anatomy_synthetic brings the repository onto the path and the task's facts from script.
from anatomy_synthetic import COORDINATE_COLUMNS, SAGITTAL_T2, decimal_strings  # noqa: E402

from script import LEVELS, SEVERITY_NAMES, WIDE_LABEL_COLUMNS  # noqa: E402

REPOSITORY_ROOT = TESTS.parent
DATA_FILE = "vb3_shared30.npz"
CONDITION = "spinal_canal_stenosis"
SPACING_MM = (3.5, 4.5)  # Slice spacing (and slab thickness) drawn per subject.
IMAGE_SIZES = (288, 300, 320)  # Pixels across the 224 mm field of view, one drawn per subject.
ORIGIN_SHIFT_MM = 20.0
GAIN = (4.0, 12.0)
SLAB_SAMPLES = 64  # Points per slab at which the linear interpolant across the body is averaged.
CONTRASTS = ("water", "inverted", "gamma")
GAMMA = 2.5
ROW_DIRECTION = np.array([0.0, 1.0, 0.0])  # r: increasing column index, anterior → posterior.
COLUMN_DIRECTION = np.array([0.0, 0.0, -1.0])  # c: increasing row index, superior → inferior.


def data_dir():
    """Where the real MR data live: SPINE_MR_DIR, else <repository>/../shared/real/spine_mr."""
    return Path(os.environ.get("SPINE_MR_DIR") or REPOSITORY_ROOT.parent / "shared" / "real" / "spine_mr")


def data_path():
    """The npz file, or None when it is absent (callers skip)."""
    path = data_dir() / DATA_FILE
    return path if path.is_file() else None


def load_data(path=None):
    """{"volumes", "points", "names"} from the npz, read into memory."""
    path = Path(path) if path else data_path()
    if path is None or not path.is_file():
        raise FileNotFoundError(f"{DATA_FILE} not found in {data_dir()} (set SPINE_MR_DIR)")
    with np.load(path) as data:
        return {key: data[key] for key in ("volumes", "points", "names")}


def parse_subjects(text):
    """ "0-5,8,10-12" → [0, 1, 2, 3, 4, 5, 8, 10, 11, 12]; "" → []."""
    subjects = []
    for part in (part.strip() for part in str(text).split(",")):
        if not part:
            continue
        low, _, high = part.partition("-")
        subjects.extend(range(int(low), int(high or low) + 1))
    return subjects


def study_id_of(subject):
    """A stable competition-like study id for a subject index."""
    return 4_100_000 + 37 * subject


@dataclass
class SubjectPlan:
    """One subject's draws: everything its series depends on besides the volume."""

    subject: int
    study_id: int
    series_id: int
    spacing: float  # Slice spacing and slab thickness, mm.
    phase: float  # Where the first slab starts, mm past the volume's edge.
    size: int  # Pixels per side.
    origin: np.ndarray  # World (x, y, z) of voxel (0, 0, 0).
    gain: float
    ascending: bool  # Instance numbers along +x.


def subject_plan(subject, seed=0, contrast="water"):
    """A subject's draws, from (seed, subject) only; the series id also tells the contrast apart."""
    rng = np.random.default_rng([seed, subject])
    spacing = round(float(rng.uniform(*SPACING_MM)), 3)
    return SubjectPlan(
        subject=subject,
        study_id=study_id_of(subject),
        series_id=100_000_000 + 1009 * subject + 7 * CONTRASTS.index(contrast),
        spacing=spacing,
        phase=float(rng.uniform(0.0, spacing)),
        size=int(rng.choice(IMAGE_SIZES)),
        origin=rng.uniform(-ORIGIN_SHIFT_MM, ORIGIN_SHIFT_MM, 3) + np.array([-38.0, -112.0, 112.0]),
        gain=float(rng.uniform(*GAIN)),
        ascending=subject % 2 == 0,
    )


def slab_bounds(plan, depth):
    """[(low, high), ...] in voxel units across the body: contiguous slabs inside [-0.5, depth - 0.5]."""
    start, bounds = -0.5 + plan.phase, []
    while start + plan.spacing <= depth - 0.5 + 1e-9:
        bounds.append((start, start + plan.spacing))
        start += plan.spacing
    return bounds


def slab_weights(low, high, depth):
    """Weights over the voxels across the body that average the linear interpolant over [low, high]."""
    samples = np.clip(low + (np.arange(SLAB_SAMPLES) + 0.5) / SLAB_SAMPLES * (high - low), 0.0, depth - 1.0)
    lower = np.minimum(np.floor(samples).astype(int), depth - 2)
    fraction = samples - lower
    weights = np.zeros(depth)
    np.add.at(weights, lower, 1.0 - fraction)
    np.add.at(weights, lower + 1, fraction)
    return weights / SLAB_SAMPLES


def body_mask(image):
    """The body on a slab: the blurred image above a low threshold, with its holes (bowel gas, lungs) filled."""
    blurred = cv2.GaussianBlur(image.astype(np.float32), (0, 0), 3.0)
    mask = (blurred > 0.08 * np.percentile(image, 99.5)).astype(np.uint8)
    padded = np.pad(mask, 1)
    outside = padded.copy()
    cv2.floodFill(outside, None, (0, 0), 2)
    return (outside[1:-1, 1:-1] != 2) | (mask > 0)


def apply_contrast(image, contrast):
    """A slab (float, 0-255) in the chosen contrast; see the module docstring."""
    if contrast == "water":
        return image
    if contrast == "inverted":
        top = np.percentile(image, 99.5)
        return np.where(body_mask(image), np.clip(top - image, 0.0, None) + 0.1 * top, 0.0)
    if contrast == "gamma":
        return 255.0 * (np.clip(image, 0, 255) / 255.0) ** GAMMA
    raise ValueError(f"contrast must be one of {', '.join(CONTRASTS)}, not {contrast!r}")


@dataclass
class Slice:
    """One written instance: its tags as read back."""

    instance_number: int
    centre: float  # Slab centre across the body, voxel units.
    position: np.ndarray  # ImagePositionPatient, as read back.
    position_texts: list


@dataclass
class SubjectSeries:
    """One subject's Sagittal T2/STIR series: the plan, its slices in position order (+x) and the pixel spacing."""

    plan: SubjectPlan
    slices: list
    spacing: float  # PixelSpacing, both ways, as read back.
    spacing_texts: list
    orientation_texts: list

    def world(self, row, column, k):
        """World (x, y, z) of voxel coordinates of the source volume."""
        return self.plan.origin + np.array([k, column, -row], float)

    def project(self, slice_, point):
        """(x, y, signed distance along the normal r × c) of a world point relative to a slice."""
        offset = np.asarray(point, float) - slice_.position
        normal = np.cross(ROW_DIRECTION, COLUMN_DIRECTION)
        return offset @ ROW_DIRECTION / self.spacing, offset @ COLUMN_DIRECTION / self.spacing, offset @ normal

    def nearest(self, point):
        """(slice, x, y, distance) of the slice whose centre plane is nearest to a world point."""
        found = [(slice_, *self.project(slice_, point)) for slice_ in self.slices]
        return min(found, key=lambda item: abs(item[3]))


def plan_series(plan, depth):
    """A subject's series geometry (no pixels yet)."""
    bounds = slab_bounds(plan, depth)
    size = plan.size
    spacing_texts, spacing = decimal_strings([224.0 / size] * 2, 6)
    orientation_texts, _ = decimal_strings(np.concatenate([ROW_DIRECTION, COLUMN_DIRECTION]), 7)
    # Pixel (0, 0)'s centre lies at source voxel (0.5·Δ − 0.5, 0.5·Δ − 0.5) (cv2.resize's bilinear mapping).
    corner = 0.5 * spacing[0] - 0.5
    count = len(bounds)
    slices = []
    for rank, (low, high) in enumerate(bounds):
        centre = (low + high) / 2
        position_texts, position = decimal_strings(plan.origin + np.array([centre, corner, -corner]), 4)
        instance = rank + 1 if plan.ascending else count - rank
        slices.append(Slice(instance, centre, position, position_texts))
    return SubjectSeries(plan, slices, float(spacing[0]), spacing_texts, orientation_texts)


def render_slices(volume, series, contrast):
    """{instance_number: uint16 image} of a series, from the subject's volume."""
    depth = volume.shape[2]
    plan, images = series.plan, {}
    for slice_ in series.slices:
        low, high = slice_.centre - plan.spacing / 2, slice_.centre + plan.spacing / 2
        slab = np.tensordot(volume.astype(np.float32), slab_weights(low, high, depth).astype(np.float32), axes=(2, 0))
        slab = apply_contrast(slab, contrast)
        resized = cv2.resize(slab.astype(np.float32), (plan.size, plan.size), interpolation=cv2.INTER_LINEAR)
        images[slice_.instance_number] = np.clip(np.round(resized * plan.gain), 0, 4095).astype(np.uint16)
    return images


def write_slice(path, series, slice_, stored):
    """Write one instance as an MR image storage file (no SliceThickness or SpacingBetweenSlices)."""
    plan = series.plan
    study_id, series_id, instance = plan.study_id, plan.series_id, slice_.instance_number
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.MediaStorageSOPClassUID = MRImageStorage
    dataset.SOPClassUID = MRImageStorage
    dataset.SOPInstanceUID = generate_uid(entropy_srcs=["real-mr", str(study_id), str(series_id), str(instance)])
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.StudyInstanceUID = generate_uid(entropy_srcs=["real-mr", str(study_id)])
    dataset.SeriesInstanceUID = generate_uid(entropy_srcs=["real-mr", str(study_id), str(series_id)])
    dataset.FrameOfReferenceUID = generate_uid(entropy_srcs=["real-mr", str(study_id), "frame"])
    dataset.Modality = "MR"
    dataset.PatientID = str(study_id)
    dataset.PatientPosition = "HFS"
    dataset.SeriesNumber = 1
    dataset.SeriesDescription = SAGITTAL_T2
    dataset.InstanceNumber = instance
    dataset.ImagePositionPatient = slice_.position_texts
    dataset.ImageOrientationPatient = series.orientation_texts
    dataset.PixelSpacing = series.spacing_texts
    dataset.RescaleSlope = "1"
    dataset.RescaleIntercept = "0"
    dataset.set_pixel_data(stored, "MONOCHROME2", bits_stored=12, generate_instance_uid=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(path, enforce_file_format=True)


TRUTH_COLUMNS = [*COORDINATE_COLUMNS, "world_x", "world_y", "world_z", "distance_to_slice", "subject", "name"]
POINT_COLUMNS = [*TRUTH_COLUMNS, "slice_spacing", "pixel_spacing", "split"]


def level_name(level):
    """ "l1_l2" → "L1/L2", the competition's spelling."""
    return level.upper().replace("_", "/")


def point_rows(series, voxel_points, split, name):
    """One row per level: the coordinate columns, the world point and where it lies relative to its slice."""
    plan, rows = series.plan, []
    for level, (row, column, k) in zip(LEVELS, voxel_points):
        world = series.world(row, column, k)
        slice_, x, y, distance = series.nearest(world)
        rows.append(
            {
                "study_id": plan.study_id,
                "series_id": plan.series_id,
                "instance_number": slice_.instance_number,
                "condition": CONDITION.replace("_", " ").title(),
                "level": level_name(level),
                "x": round(float(x), 6),
                "y": round(float(y), 6),
                "world_x": round(float(world[0]), 6),
                "world_y": round(float(world[1]), 6),
                "world_z": round(float(world[2]), 6),
                "distance_to_slice": round(float(distance), 6),
                "slice_spacing": plan.spacing,
                "pixel_spacing": series.spacing,
                "subject": plan.subject,
                "name": name,
                "split": split,
            }
        )
    return rows


def labels_row(study_id):
    """A train.csv row: the spinal canal levels Normal/Mild (healthy volunteers), the rest blank."""
    row = {"study_id": study_id}
    row.update({column: SEVERITY_NAMES[0] if column.startswith(CONDITION) else "" for column in WIDE_LABEL_COLUMNS})
    return row


@dataclass
class RealCompetition:
    """Where the competition was written and what it holds."""

    root: Path
    train_study_ids: list
    test_study_ids: list
    subjects: dict  # study_id → subject index into the npz.
    # One row per study and level, train and test: the coordinate columns, world_x/_y/_z (mm), the signed
    # distance_to_slice along the normal, slice_spacing, pixel_spacing, subject, name, split.
    points: pd.DataFrame
    series: dict  # study_id → SubjectSeries.


def write_real_mr_competition(root, train, test, seed=0, contrast="water", data=None):
    """Write a competition folder under root (new or empty) from the subjects `train` and `test` (indices).

    data: load_data()'s dict, to read the npz once for many folders; read here when not given.
    """
    root = Path(root)
    train, test = [int(subject) for subject in train], [int(subject) for subject in test]
    if contrast not in CONTRASTS:
        raise ValueError(f"contrast must be one of {', '.join(CONTRASTS)}, not {contrast!r}")
    if set(train) & set(test) or len(set(train)) < len(train) or len(set(test)) < len(test):
        raise ValueError("a subject may be in one split, once")
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty; old files would mix with new ones")
    data = data if data is not None else load_data()
    volumes, points, names = data["volumes"], data["points"], data["names"]
    bad = [subject for subject in train + test if not 0 <= subject < len(volumes)]
    if bad:
        raise ValueError(f"subjects {bad} are not in 0-{len(volumes) - 1}")
    rows, series_rows, all_series = [], [], {}
    for split, subjects in (("train", train), ("test", test)):
        for subject in subjects:
            plan = subject_plan(subject, seed, contrast)
            series = plan_series(plan, volumes.shape[3])
            folder = root / f"{split}_images" / str(plan.study_id) / str(plan.series_id)
            images = render_slices(volumes[subject], series, contrast)
            for slice_ in series.slices:
                write_slice(folder / f"{slice_.instance_number}.dcm", series, slice_, images[slice_.instance_number])
            rows.extend(point_rows(series, points[subject], split, str(names[subject])))
            series_rows.append(
                {
                    "split": split,
                    "study_id": plan.study_id,
                    "series_id": plan.series_id,
                    "series_description": SAGITTAL_T2,
                }
            )
            all_series[plan.study_id] = series
    table = pd.DataFrame(rows, columns=POINT_COLUMNS)
    descriptions = pd.DataFrame(series_rows, columns=["split", "study_id", "series_id", "series_description"])
    for split in ("train", "test"):
        part = descriptions[descriptions["split"] == split]
        part[["study_id", "series_id", "series_description"]].to_csv(
            root / f"{split}_series_descriptions.csv", index=False
        )
    train_ids = [study_id_of(subject) for subject in train]
    test_ids = [study_id_of(subject) for subject in test]
    pd.DataFrame([labels_row(study_id) for study_id in train_ids], columns=["study_id", *WIDE_LABEL_COLUMNS]).to_csv(
        root / "train.csv", index=False
    )
    table[table["split"] == "train"][COORDINATE_COLUMNS].to_csv(root / "train_label_coordinates.csv", index=False)
    row_ids = [f"{study_id}_{column}" for study_id in test_ids for column in WIDE_LABEL_COLUMNS]
    submission = pd.DataFrame({"row_id": row_ids, "normal_mild": 1 / 3, "moderate": 1 / 3, "severe": 1 / 3})
    submission.to_csv(root / "sample_submission.csv", index=False, float_format="%.6f")
    (root / "_truth").mkdir()
    truth = table[table["split"] == "test"][TRUTH_COLUMNS]
    truth.to_csv(root / "_truth" / "test_label_coordinates.csv", index=False)
    pd.DataFrame([labels_row(study_id) for study_id in test_ids], columns=["study_id", *WIDE_LABEL_COLUMNS]).to_csv(
        root / "_truth" / "test_labels.csv", index=False
    )
    subjects = {study_id_of(subject): subject for subject in train + test}
    return RealCompetition(root, train_ids, test_ids, subjects, table, all_series)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="New or empty folder to write into.")
    parser.add_argument("--train", default="0-23", help="Train subjects, indices into the npz (default 0-23).")
    parser.add_argument("--test", default="24-29", help="Test subjects (default 24-29).")
    parser.add_argument("--seed", type=int, default=0, help="Draws each subject's spacing, phase, pixels, origin.")
    parser.add_argument("--contrast", choices=CONTRASTS, default="water", help="water, or a simulated other look.")
    parser.add_argument("--data", type=Path, default=None, help=f"The npz (default: {data_dir() / DATA_FILE}).")
    arguments = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        data = load_data(arguments.data)
    except FileNotFoundError as error:
        print(error, file=sys.stderr)
        return 2
    competition = write_real_mr_competition(
        arguments.out,
        parse_subjects(arguments.train),
        parse_subjects(arguments.test),
        arguments.seed,
        arguments.contrast,
        data,
    )
    print(
        f"Wrote {len(competition.train_study_ids)} train and {len(competition.test_study_ids)} test studies "
        f"({arguments.contrast}) to {competition.root} in {time.perf_counter() - started:.0f} s."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
