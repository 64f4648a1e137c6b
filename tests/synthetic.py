"""
Deterministic generator of synthetic lumbar spine datasets in the project's seed layout.

The layout, relative to a data directory ROOT, is:

    ROOT/train.csv          row_id,image_path,normal_mild,moderate,severe (one-hot 0/1 labels)
    ROOT/test.csv           row_id,image_path
    ROOT/images/train/*.png and ROOT/images/test/*.png, named by row_id
    ROOT/test_labels.csv    row_id,normal_mild,moderate,severe (only when asked, for tests)

Each picture is a small grayscale sagittal slice: two bright vertebral bodies, the disc between
them, the bright fluid column of the spinal canal behind them and the posterior elements. The
disc bulges into the canal further the more severe the label is, so a small network can learn the
grade, while per-picture jitter in position, brightness, bulge and noise keeps the classes from
being pixel-identical.

The same arguments always give byte-identical files. The tests, the benchmarks and the sample
dataset shipped at the repository root all come from here; regenerate that sample with:

    python tests/synthetic.py

Condition, level and class names are read from script.py, so they are defined in one place only.
"""

import argparse
import math
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
if str(REPOSITORY_ROOT) not in sys.path:
    sys.path.insert(0, str(REPOSITORY_ROOT))

from script import CLASS_NAMES, CONDITIONS, LEVELS  # noqa: E402  (needs the path set up above)

ROWS_PER_STUDY = len(CONDITIONS) * len(LEVELS)
SAMPLE_TRAIN_STUDIES = 16  # With the two below, the shipped sample stays near 2 MB.
SAMPLE_TEST_STUDIES = 2
SAMPLE_IMAGE_SIZE = 64
SAMPLE_CLASS_MIX = (0.6, 0.25, 0.15)  # Richer in rare classes than real data, so small sets hold all three.
REAL_CLASS_MIX = (0.77, 0.16, 0.06)  # The competition's train labels, rounded; for realistic benchmarks.
MINIMUM_ROWS_PER_CLASS = 3
VARIANTS = ("gray8", "gray16", "bgr", "bgra", "uppercase_extension")

# How far the disc reaches past the back of the vertebral bodies, as a fraction of the picture
# width, for each class. The fluid column starts 0.06 behind them, so a normal disc stays clear of
# it, a moderate one covers about a third of it and a severe one nearly closes it.
BULGE_BY_CLASS = (0.03, 0.11, 0.19)
BULGE_JITTER = 0.02
POSITION_JITTER = 0.05
NOISE_LEVEL = 7.0


def make_dataset(
    root,
    train_studies=SAMPLE_TRAIN_STUDIES,
    test_studies=SAMPLE_TEST_STUDIES,
    train_rows=None,
    test_rows=None,
    image_size=SAMPLE_IMAGE_SIZE,
    seed=0,
    class_mix=SAMPLE_CLASS_MIX,
    plain_row_ids=False,
    write_test_labels=False,
    variant="gray8",
):
    """Write a synthetic dataset in the seed layout under root and return a summary of it.

    Each study contributes one row per condition and level, as in the competition. train_rows and
    test_rows, when given, override the study counts with an exact number of rows (the last study is
    then partial). plain_row_ids names rows img_00001, img_00002, ... instead, test numbers following
    train's, so that row_ids carry no study, condition or level. class_mix is the relative frequency
    of each class; every class still appears at least MINIMUM_ROWS_PER_CLASS times in a split with
    room for it. write_test_labels also writes ROOT/test_labels.csv with the hidden test labels.
    variant is one of VARIANTS and applies to every picture. Stale pictures under ROOT/images/train
    and ROOT/images/test are deleted first.

    The summary holds the root, the paths of the written tables (test_labels_csv is None unless
    asked for), the row count of each split and the count of each class in train.
    """
    root = Path(root)
    generator = np.random.default_rng(seed)
    train_count = train_rows if train_rows is not None else train_studies * ROWS_PER_STUDY
    test_count = test_rows if test_rows is not None else test_studies * ROWS_PER_STUDY
    if plain_row_ids:
        row_ids = [f"img_{number:05d}" for number in range(1, train_count + test_count + 1)]
    else:
        row_ids = competition_row_ids(train_count, test_count, generator)
    remove_stale_images(root)
    train = write_split(root, "train", row_ids[:train_count], image_size, class_mix, variant, generator)
    test = write_split(root, "test", row_ids[train_count:], image_size, class_mix, variant, generator)
    train.to_csv(root / "train.csv", index=False)
    test[["row_id", "image_path"]].to_csv(root / "test.csv", index=False)
    summary = {
        "root": root,
        "train_csv": root / "train.csv",
        "test_csv": root / "test.csv",
        "test_labels_csv": None,
        "train_rows": len(train),
        "test_rows": len(test),
        "train_class_counts": {name: int(train[name].sum()) for name in CLASS_NAMES},
    }
    if write_test_labels:
        test[["row_id", *CLASS_NAMES]].to_csv(root / "test_labels.csv", index=False)
        summary["test_labels_csv"] = root / "test_labels.csv"
    return summary


def competition_row_ids(train_count, test_count, generator):
    """Return row_ids like 4003253_spinal_canal_stenosis_l1_l2, train first, with no study in both splits."""
    train_study_count = math.ceil(train_count / ROWS_PER_STUDY)
    test_study_count = math.ceil(test_count / ROWS_PER_STUDY)
    # Competition study ids have 7 to 9 digits; drawing them without replacement keeps them unique.
    study_ids = 1_000_000 + generator.choice(999_000_000, train_study_count + test_study_count, replace=False)
    suffixes = [f"{condition}_{level}" for condition in CONDITIONS for level in LEVELS]
    rows_of_studies = [[f"{study_id}_{suffix}" for suffix in suffixes] for study_id in study_ids]
    train_ids = [row_id for rows in rows_of_studies[:train_study_count] for row_id in rows][:train_count]
    test_ids = [row_id for rows in rows_of_studies[train_study_count:] for row_id in rows][:test_count]
    return train_ids + test_ids


def remove_stale_images(root):
    """Delete pictures left in root's image folders by an earlier, possibly larger, dataset."""
    for folder in (root / "images" / "train", root / "images" / "test"):
        if folder.is_dir():
            for path in folder.iterdir():
                if path.suffix.lower() == ".png":
                    path.unlink()


def write_split(root, split, row_ids, image_size, class_mix, variant, generator):
    """Draw labels and pictures for one split, write the pictures and return its labelled table."""
    folder = root / "images" / split
    folder.mkdir(parents=True, exist_ok=True)
    labels = draw_labels(len(row_ids), class_mix, generator)
    extension = ".PNG" if variant == "uppercase_extension" else ".png"
    image_paths = [f"images/{split}/{row_id}{extension}" for row_id in row_ids]
    for image_path, label in zip(image_paths, labels):
        write_picture(root / image_path, draw_spine(label, image_size, generator), variant)
    table = pd.DataFrame({"row_id": row_ids, "image_path": image_paths})
    for class_index, class_name in enumerate(CLASS_NAMES):
        table[class_name] = (labels == class_index).astype(int)
    return table


def draw_labels(count, class_mix, generator):
    """Return count class indices drawn with class_mix, each class at least a few times when there is room."""
    minimum = min(MINIMUM_ROWS_PER_CLASS, count // len(CLASS_NAMES))
    guaranteed = np.repeat(np.arange(len(CLASS_NAMES)), minimum)
    probabilities = np.asarray(class_mix, dtype=float) / np.sum(class_mix)
    drawn = generator.choice(len(CLASS_NAMES), count - len(guaranteed), p=probabilities)
    return generator.permutation(np.concatenate([guaranteed, drawn]))


def draw_spine(label, image_size, generator):
    """Return one 8-bit grayscale sagittal picture whose disc bulges into the canal more with severity."""
    canvas = np.zeros((image_size, image_size), dtype=np.float32)
    offset = generator.uniform(-POSITION_JITTER, POSITION_JITTER, size=2)
    brightness = generator.uniform(0.85, 1.15)
    bulge = BULGE_BY_CLASS[label] + generator.uniform(-BULGE_JITTER, BULGE_JITTER)

    def pixel(x, y):
        """Convert a position in fractions of the picture, shifted by this picture's offset, to pixels."""
        return (round((x + offset[0]) * image_size), round((y + offset[1]) * image_size))

    def length(fraction):
        """Convert a length in fractions of the picture to whole pixels, at least one."""
        return max(1, round(fraction * image_size))

    # Fluid first, then bone and disc over it, so the bulging disc hides the fluid it presses on.
    cv2.rectangle(canvas, pixel(0.58, -0.1), pixel(0.72, 1.1), 210.0, thickness=-1)
    cv2.rectangle(canvas, pixel(0.12, 0.05), pixel(0.52, 0.38), 150.0, thickness=-1)
    cv2.rectangle(canvas, pixel(0.12, 0.62), pixel(0.52, 0.95), 150.0, thickness=-1)
    cv2.ellipse(canvas, pixel(0.32, 0.5), (length(0.21), length(0.08)), 0, 0, 360, 110.0, thickness=-1)
    cv2.ellipse(canvas, pixel(0.52, 0.5), (length(bulge), length(0.1)), 0, 0, 360, 110.0, thickness=-1)
    for y in (0.22, 0.78):
        cv2.ellipse(canvas, pixel(0.86, y), (length(0.08), length(0.12)), 0, 0, 360, 130.0, thickness=-1)

    # Blurring softens the drawn edges like a real scan; the noise stands in for MRI grain.
    canvas = cv2.GaussianBlur(canvas * brightness, (0, 0), sigmaX=image_size / 64)
    canvas += 15.0 + generator.normal(0.0, NOISE_LEVEL, size=canvas.shape)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def encode_picture(picture, variant):
    """Return the 8-bit grayscale picture in the pixel format of variant (one of VARIANTS)."""
    if variant in ("gray8", "uppercase_extension"):
        return picture
    if variant == "gray16":
        # Multiplying by 257 maps 0..255 exactly onto 0..65535, so the picture looks the same.
        return picture.astype(np.uint16) * 257
    if variant == "bgr":
        return cv2.cvtColor(picture, cv2.COLOR_GRAY2BGR)
    if variant == "bgra":
        return cv2.cvtColor(picture, cv2.COLOR_GRAY2BGRA)
    raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")


def write_picture(path, picture, variant="gray8"):
    """Write the 8-bit grayscale picture to path as a PNG in the pixel format of variant."""
    if not cv2.imwrite(str(path), encode_picture(picture, variant)):
        raise OSError(f"could not write {path}")


def convert_image(root, row_id, variant):
    """Rewrite one already written picture of root's dataset as variant and return its new image_path.

    For "uppercase_extension" the file is renamed to .PNG and its row in train.csv or test.csv is
    updated to match; the other variants keep the file name and only change its pixel format.
    """
    root = Path(root)
    for table_name in ("train.csv", "test.csv"):
        table = pd.read_csv(root / table_name)
        matches = table.index[table["row_id"] == row_id]
        if len(matches) == 0:
            continue
        old_image_path = table.at[matches[0], "image_path"]
        picture = cv2.imread(str(root / old_image_path), cv2.IMREAD_GRAYSCALE)
        if variant != "uppercase_extension":
            write_picture(root / old_image_path, picture, variant)
            return old_image_path
        new_image_path = str(Path(old_image_path).with_suffix(".PNG"))
        write_picture(root / new_image_path, picture, variant)
        (root / old_image_path).unlink()
        table.at[matches[0], "image_path"] = new_image_path
        table.to_csv(root / table_name, index=False)
        return new_image_path
    raise KeyError(f"row_id {row_id!r} is in neither train.csv nor test.csv under {root}")


# The learning check (tests/test_learning.py and benchmarks/learning.py): one bright square per picture, anywhere
# on a noisy background, its side a fraction of the picture that grows with the class. It needs no anatomy to read,
# so a network trained from scratch has to learn it within a few epochs; one that cannot is broken.
SQUARE_SIDE_BY_CLASS = (0.2, 0.45, 0.7)
SQUARE_SIDE_JITTER = 0.04


def make_squares_dataset(root, train_rows=240, test_rows=60, image_size=32, seed=0):
    """Write the learning check's dataset in the seed layout, with ROOT/test_labels.csv; returns the root.

    Classes are balanced and row_ids plain (sq_00001, ...), so each row is its own study.
    """
    root = Path(root)
    generator = np.random.default_rng(seed)
    remove_stale_images(root)
    tables = []
    for split, count, first in (("train", train_rows, 1), ("test", test_rows, train_rows + 1)):
        folder = root / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        labels = generator.permutation(np.arange(count) % len(CLASS_NAMES))
        table = pd.DataFrame({"row_id": [f"sq_{first + index:05d}" for index in range(count)]})
        table["image_path"] = [f"images/{split}/{row_id}.png" for row_id in table["row_id"]]
        for image_path, label in zip(table["image_path"], labels):
            write_picture(root / image_path, draw_square(label, image_size, generator))
        for class_index, class_name in enumerate(CLASS_NAMES):
            table[class_name] = (labels == class_index).astype(int)
        tables.append(table)
    train, test = tables
    train.to_csv(root / "train.csv", index=False)
    test[["row_id", "image_path"]].to_csv(root / "test.csv", index=False)
    test[["row_id", *CLASS_NAMES]].to_csv(root / "test_labels.csv", index=False)
    return root


def draw_square(label, image_size, generator):
    """One 8-bit grayscale picture: a bright square whose side grows with the class, on noise."""
    side = (SQUARE_SIDE_BY_CLASS[label] + generator.uniform(-SQUARE_SIDE_JITTER, SQUARE_SIDE_JITTER)) * image_size
    side = max(2, round(side))
    left, top = generator.integers(0, image_size - side + 1, size=2)
    canvas = np.full((image_size, image_size), 40.0, dtype=np.float32)
    canvas[top : top + side, left : left + side] = generator.uniform(150.0, 230.0)
    canvas += generator.normal(0.0, 12.0, size=canvas.shape)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def parse_arguments(arguments=None):
    """Parse the command line; with no options it describes the sample shipped at the repository root."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPOSITORY_ROOT, help="data directory to write")
    parser.add_argument("--train-studies", type=int, default=SAMPLE_TRAIN_STUDIES, help="train studies")
    parser.add_argument("--test-studies", type=int, default=SAMPLE_TEST_STUDIES, help="test studies")
    parser.add_argument("--image-size", type=int, default=SAMPLE_IMAGE_SIZE, help="picture side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random generator")
    return parser.parse_args(arguments)


def main(arguments=None):
    """Write a dataset as the command line asks and print what was written."""
    options = parse_arguments(arguments)
    summary = make_dataset(
        options.out,
        train_studies=options.train_studies,
        test_studies=options.test_studies,
        image_size=options.image_size,
        seed=options.seed,
    )
    print(
        f"Wrote {summary['train_rows']} train rows {summary['train_class_counts']} "
        f"and {summary['test_rows']} test rows under {summary['root']}"
    )


if __name__ == "__main__":
    main()
