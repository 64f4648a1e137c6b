"""
The level localiser on real T2 sagittal slices from another scanner (issue 25, part 4): a look, judged by eye.

    python tests/real_mr_competition.py --out COMP --train 0-29 --test ""
    python script.py --data-dir COMP --output-dir OUT --weights none --image-size 64 --epochs 1 --fine-tune-epochs 0 \
        --localiser-epochs 30 --no-test
    python benchmarks/real_mr_other_scanner.py --model OUT/localiser.keras --work-dir DIR
    python benchmarks/real_mr_other_scanner.py --model OUT/localiser.keras --work-dir DIR --judged JUDGED.csv

The localiser is trained on the 30 real water-image volumes of `../shared/real/spine_mr` (as the issue's hidden check
trains it), then localises `../shared/real/sagittal_mri_png`: 20 real T2-weighted sagittal slices of other people
from another scanner (256 × 256 px, 8-bit, no labels and no geometry; MIT licence, Sulaiman Vesal; several are off
the midline, through the foramina). Each image becomes a test study with one Sagittal T2/STIR series of one slice:
PixelSpacing FOV / 256 with the field of view assumed (--fov-mm, default 300 mm: a lumbar sagittal protocol's usual
field; the discs of the midline slices lie 24-28 px apart), the same orientation as the training volumes (rows
anterior → posterior, columns head → foot). Then, as a user would:

    python SCRIPT localise --model MODEL --competition-dir DIR/competition --split test --out DIR/points.csv

There are no true points, so the script draws the five found canal levels on each image (DIR/overlays.png; it shows
the images, so it stays out of the repository) and a person writes down which disc each level landed on, as a CSV of
image, level, landed (a level name "T12/L1" to "L5/S1", "S1" for the sacrum, "none" off the discs, "?" where
the image does not show). With --judged, it prints and records the tally: levels on their own disc, images with all
five right, with two levels on one disc, with the chain counted one level off; and always the found chain's step in
pixels, to set beside the discs'. --field-mm F first cuts each image's centre to F mm (224: the training volumes'
field, so that the localiser sees their scale). Needs the PNGs (PNG_DIR, else
<repository>/../shared/real/sagittal_mri_png); the judgement is a person's reading, not a measurement against labels.
"""

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY / "tests"))
sys.path.insert(0, str(REPOSITORY / "benchmarks"))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import real_mr_competition as R  # noqa: E402  (brings script's task facts too)
from anatomy_synthetic import SAGITTAL_T2, decimal_strings  # noqa: E402
from real_mr import LEVEL_NAMES, git, run, script_commit  # noqa: E402

RESULTS = REPOSITORY / "benchmarks" / "real_mr_other_scanner_results.json"
DISCS = ["T12/L1", *LEVEL_NAMES, "S1"]  # What a level can land on, head to foot; "S1": the sacrum below L5/S1.
COLOURS = [(0, 0, 255), (0, 160, 255), (0, 255, 255), (0, 255, 0), (255, 128, 0)]  # L1/L2 → L5/S1, BGR


def png_dir():
    """The other scanner's slices: PNG_DIR, else <repository>/../shared/real/sagittal_mri_png."""
    return Path(os.environ.get("PNG_DIR") or REPOSITORY.parent / "shared" / "real" / "sagittal_mri_png")


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0], allow_abbrev=False)
    parser.add_argument("--model", type=Path, required=True, help="a trained localiser (OUT/localiser.keras)")
    parser.add_argument("--work-dir", type=Path, required=True, help="where the competition and overlays go")
    parser.add_argument("--script", type=Path, default=REPOSITORY / "script.py", help="the script.py to run")
    parser.add_argument("--png-dir", type=Path, default=None, help=f"the slices (default: {png_dir()})")
    parser.add_argument("--fov-mm", type=float, default=300.0, help="assumed field of view (default 300 mm)")
    parser.add_argument(
        "--field-mm",
        type=float,
        default=None,
        help="cut each image's centre to this field first (224: the training volumes' field, so the same scale)",
    )
    parser.add_argument("--judged", type=Path, default=None, help="CSV of image, level, landed: tally and record")
    parser.add_argument("--results", type=Path, default=RESULTS, help=f"JSON to write (default: {RESULTS})")
    return parser.parse_args(argv)


def study_id_of(image):
    return 4_200_000 + 41 * image


def write_test_split(root, images, fov_mm):
    """A competition folder whose test split holds one single-slice Sagittal T2/STIR study per image; the train CSVs
    are empty (localise reads only the test split)."""
    rows = []
    for image, pixels in images.items():
        study_id, series_id = study_id_of(image), 200_000_000 + 1013 * image
        size = pixels.shape[0]
        plan = R.SubjectPlan(image, study_id, series_id, 4.0, 0.0, size, np.zeros(3), 1.0, True)
        spacing_texts, spacing = decimal_strings([fov_mm / size] * 2, 6)
        orientation_texts, _ = decimal_strings(np.concatenate([R.ROW_DIRECTION, R.COLUMN_DIRECTION]), 7)
        position_texts, position = decimal_strings([0.0, -fov_mm / 2, fov_mm / 2], 4)
        series = R.SubjectSeries(plan, [], float(spacing[0]), spacing_texts, orientation_texts)
        slice_ = R.Slice(1, 0.0, position, position_texts)
        stored = pixels.astype(np.uint16) * 16  # 12 bits, as a scanner stores them
        R.write_slice(root / "test_images" / str(study_id) / str(series_id) / "1.dcm", series, slice_, stored)
        rows.append({"study_id": study_id, "series_id": series_id, "series_description": SAGITTAL_T2})
    pd.DataFrame(rows).to_csv(root / "test_series_descriptions.csv", index=False)
    pd.DataFrame(columns=["study_id", "series_id", "series_description"]).to_csv(
        root / "train_series_descriptions.csv", index=False
    )
    row_ids = [f"{row['study_id']}_{column}" for row in rows for column in R.WIDE_LABEL_COLUMNS]
    pd.DataFrame({"row_id": row_ids, "normal_mild": 1 / 3, "moderate": 1 / 3, "severe": 1 / 3}).to_csv(
        root / "sample_submission.csv", index=False, float_format="%.6f"
    )


def centre_cut(pixels, share):
    """The central square of an image, `share` of its side."""
    size = int(round(pixels.shape[0] * share))
    start = (pixels.shape[0] - size) // 2
    return pixels[start : start + size, start : start + size]


def draw_overlays(images, points, path):
    """The images, 512 px each, five per row, with each canal level's found point and name drawn on it."""
    tiles = []
    for image, pixels in images.items():
        tile = cv2.cvtColor(cv2.resize(pixels, (512, 512), interpolation=cv2.INTER_CUBIC), cv2.COLOR_GRAY2BGR)
        scale = 512 / pixels.shape[0]
        found = points[points["study_id"] == study_id_of(image)]
        for colour, level in zip(COLOURS, LEVEL_NAMES):
            for row in found[found["level"] == level].itertuples():
                centre = (int(round((row.x + 0.5) * scale - 0.5)), int(round((row.y + 0.5) * scale - 0.5)))
                cv2.circle(tile, centre, 6, colour, 2)
                cv2.putText(tile, level, (centre[0] + 10, centre[1] + 5), cv2.FONT_HERSHEY_SIMPLEX, 0.5, colour, 1)
        cv2.putText(tile, str(image), (8, 28), cv2.FONT_HERSHEY_SIMPLEX, 0.9, (255, 255, 255), 2)
        tiles.append(tile)
    tiles += [np.zeros_like(tiles[0])] * (-len(tiles) % 5)
    cv2.imwrite(str(path), np.vstack([np.hstack(tiles[start : start + 5]) for start in range(0, len(tiles), 5)]))


def chain_steps(images, points):
    """{image: mean distance in pixels between its neighbouring found canal levels}, for the images with points."""
    steps = {}
    for image in images:
        found = points[points["study_id"] == study_id_of(image)]
        if len(found):
            xy = found.set_index("level").reindex(LEVEL_NAMES)[["x", "y"]].to_numpy(float)
            steps[image] = float(np.nanmean(np.linalg.norm(np.diff(xy, axis=0), axis=1)))
    return steps


def tally(judged):
    """Per image and pooled: levels on their own disc, two levels on one disc, the chain one level off."""
    per_image = []
    for image, group in judged.groupby("image"):
        landed = dict(zip(group["level"], group["landed"]))
        shifts = [
            DISCS.index(landed[level]) - DISCS.index(level) if landed.get(level) in DISCS else None
            for level in LEVEL_NAMES
        ]
        discs = [landed.get(level) for level in LEVEL_NAMES if landed.get(level) in DISCS]
        judged_here = [landed.get(level) not in (None, "?") for level in LEVEL_NAMES]
        right = [shift == 0 for shift in shifts]
        runs = [a == b != 0 for a, b in zip(shifts, shifts[1:]) if a is not None and b is not None]
        per_image.append(
            {
                "image": int(image),
                "landed": [landed.get(level) for level in LEVEL_NAMES],
                "shifts": shifts,
                "right": sum(right),
                "judged": sum(judged_here),
                "two_on_one_disc": len(discs) > len(set(discs)),
                "chain_one_level_off": any(runs),
                "wrong": sum(judged_here) - sum(right),
            }
        )
    judged_levels = sum(row["judged"] for row in per_image)
    return per_image, {
        "images": len(per_image),
        "levels_judged": judged_levels,
        "levels_on_own_disc": sum(row["right"] for row in per_image),
        "share_on_own_disc": sum(row["right"] for row in per_image) / max(judged_levels, 1),
        "images_all_five_right": sum(row["right"] == 5 for row in per_image),
        "images_with_two_on_one_disc": sum(row["two_on_one_disc"] for row in per_image),
        "images_with_chain_one_level_off": sum(row["chain_one_level_off"] for row in per_image),
        "images_with_a_wrong_level": sum(row["wrong"] > 0 for row in per_image),
    }


def main(argv=None):
    arguments = parse_arguments(argv)
    source = arguments.png_dir or png_dir()
    paths = sorted(source.glob("*.png"), key=lambda path: int(path.stem) if path.stem.isdigit() else path.stem)
    if not paths:
        print(f"no PNG slices in {source} (set PNG_DIR or --png-dir)", file=sys.stderr)
        return 2
    images = {int(path.stem): cv2.imread(str(path), cv2.IMREAD_GRAYSCALE) for path in paths}
    fov_mm = arguments.fov_mm
    if arguments.field_mm:
        images = {image: centre_cut(pixels, arguments.field_mm / fov_mm) for image, pixels in images.items()}
        fov_mm = arguments.field_mm
    work = arguments.work_dir
    competition, points_path = work / "competition", work / "points.csv"
    if not points_path.is_file():
        if competition.exists():
            raise SystemExit(f"{competition} exists without {points_path}: remove it and rerun")
        competition.mkdir(parents=True)
        write_test_split(competition, images, fov_mm)
        command = [sys.executable, str(arguments.script), "localise", "--model", str(arguments.model)]
        command += ["--competition-dir", str(competition), "--split", "test", "--out", str(points_path)]
        seconds = run(command, work / "localise.log")
        print(f"localised {len(images)} images in {seconds:.0f} s: {points_path}")
    points = pd.read_csv(points_path)
    points = points[points["condition"].str.lower() == "spinal canal stenosis"]
    draw_overlays(images, points, work / "overlays.png")
    print(f"overlays: {work / 'overlays.png'} (judge each level's disc by eye; --judged CSV to tally)")
    steps = chain_steps(images, points)
    print(f"found chain step: median {np.median(list(steps.values())):.1f} px of the written image")
    if arguments.judged is None:
        return 0
    judged = pd.read_csv(arguments.judged, dtype={"landed": str}, keep_default_na=False)
    per_image, pooled = tally(judged)
    results = {
        "benchmark": "benchmarks/real_mr_other_scanner.py",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": git("rev-parse", "HEAD"),
        "script_commit": script_commit(arguments.script),
        "model": str(arguments.model),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "fov_mm": arguments.fov_mm,
        "field_mm": arguments.field_mm,
        "judged": str(arguments.judged),
        "pooled": pooled,
        "found_step_px": {str(image): round(step, 1) for image, step in steps.items()},
        "images": per_image,
        "localised_at": time.strftime("%Y-%m-%d", time.gmtime(points_path.stat().st_mtime)),
    }
    arguments.results.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(pooled, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
