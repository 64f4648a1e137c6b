"""
The level localiser's check, end to end, on a synthetic competition it has not seen: the three commands of the
localiser issue's hidden check, run as a user runs them, then scored against the competition's truth.

    python benchmarks/localiser_check.py --seed 23                 # 80 + 20 studies; about 30 minutes on 2 cores
    python benchmarks/localiser_check.py --seed 5 --work /tmp/c5   # keep the folders
    python benchmarks/localiser_check.py --seed 5 --work /tmp/c5 --regrade   # its models, graded plain and mirrored

The commands (each timed):

    python script.py --data-dir COMP --output-dir OUT --weights none --image-size 64 --epochs 4 \\
        --fine-tune-epochs 0 --localiser-epochs 30
    python script.py localise --model OUT/localiser.keras --competition-dir COMP --split test --out pts.csv
    python script.py predict --model OUT/model.keras --data-dir COMP --output-dir OUT2

Then: each found point's distance (mm) to its true point, by series kind, and whether it is on a slice within one
instance of the true one; the submission's score against the best constant's and against the same model given the
true test points (prepare --coordinates with the truth, then predict), whose difference is what localisation
costs. The check passes with medians ≤ 5 mm, ≥ 90 % within 10 mm, ≥ 90 % within one instance, all 25 rows of every
study, and a cost ≤ 0.05. Writes benchmarks/localiser_check_results.json (one entry per seed).
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))
sys.path.insert(0, str(REPOSITORY / "tests"))

import anatomy_synthetic  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

import script  # noqa: E402

RESULTS = REPOSITORY / "benchmarks" / "localiser_check_results.json"
TRAIN = "--weights none --image-size 64 --epochs 4 --fine-tune-epochs 0 --localiser-epochs 30".split()
KINDS = {"spinal": "canal", "foraminal": "foramen", "subarticular": "recess"}


def parse_arguments():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--seed", type=int, default=23, help="the synthetic competition's seed (default: 23)")
    parser.add_argument("--train-studies", type=int, default=80)
    parser.add_argument("--test-studies", type=int, default=20)
    parser.add_argument("--work", type=Path, help="folder for the competition and the outputs (default: a new one)")
    parser.add_argument("--script", type=Path, default=REPOSITORY / "script.py", help="the script.py to check")
    parser.add_argument(
        "--regrade",
        action="store_true",
        help="an earlier check's --work, its models kept: grade its found, true and moved points again, each crop "
        "alone (--no-predict-mirrored) and with its mirror image (--predict-mirrored), side by side",
    )
    return parser.parse_args()


def run(script_path, *arguments):
    """One command of script.py, as a user runs it; returns its seconds. Stops the check if it fails."""
    started = time.perf_counter()
    command = [sys.executable, str(script_path), *map(str, arguments)]
    print("$", " ".join(command[1:]), flush=True)
    if subprocess.run(command).returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}")
    return time.perf_counter() - started


def world_point(root, row):
    """A coordinates row's point in the world, from its slice's DICOM geometry."""
    stacks = script.read_stacks(root / "test_images" / str(row.study_id) / str(row.series_id))
    stack = next(stack for stack in stacks if row.instance_number in stack.instance_numbers)
    return stack.pixel_to_world(stack.instance_numbers.index(row.instance_number), row.x, row.y)


def localisation(root, points_path):
    """Per series kind: points placed, median and p90 error (mm), share within 10 mm, share within one instance."""
    truth = script.read_coordinates(root / "_truth" / "test_label_coordinates.csv").set_index("row_id")
    found = script.read_coordinates(points_path)
    rows = []
    for point in found.itertuples():
        true = truth.loc[point.row_id]
        error = np.linalg.norm(world_point(root, point) - world_point(root, true))
        same_series = str(point.series_id) == str(true.series_id)
        within_one = same_series and abs(int(point.instance_number) - int(true.instance_number)) <= 1
        rows.append((script.condition_groups([point.row_id]).iloc[0], float(error), within_one))
    table = pd.DataFrame(rows, columns=["group", "mm", "within_one"])
    return {
        KINDS[group]: {
            "points": len(part),
            "of": int((script.condition_groups(truth.index) == group).sum()),
            "median_mm": float(part["mm"].median()),
            "p90_mm": float(np.percentile(part["mm"], 90)),
            "within_10mm": float((part["mm"] <= 10).mean()),
            "slice_within_one": float(part["within_one"].mean()),
        }
        for group, part in table.groupby("group")
    }


def scores(root, submission_path, config_path):
    """The submission's competition score, and the best constant's, against the test labels."""
    labels = script.read_solution(root / "_truth" / "test_labels.csv")
    submission = script.read_submission(submission_path)
    constants = {key: np.array(value) for key, value in json.loads(config_path.read_text())["best_constants"].items()}
    constant = script.probabilities_frame(
        submission["row_id"], script.constant_predictions(submission["row_id"], constants)
    )
    return script.score_predictions(labels, submission)["score"], script.score_predictions(labels, constant)["score"]


def moved_points(root, distance_mm, seed):
    """The test's true coordinates, each moved distance_mm in plane in a random direction (pixels from each series'
    PixelSpacing), on its own slice."""
    truth = pd.read_csv(root / "_truth" / "test_label_coordinates.csv")
    angles = np.random.default_rng(seed).uniform(0, 2 * np.pi, len(truth))
    spacings = {}
    for key in truth[["study_id", "series_id"]].drop_duplicates().itertuples(index=False):
        stack = script.read_stacks(root / "test_images" / str(key.study_id) / str(key.series_id))[0]
        spacings[tuple(key)] = np.asarray(stack.pixel_spacing, float)  # (row, column) mm
    spacing = np.array([spacings[key] for key in zip(truth["study_id"], truth["series_id"])])
    truth["x"] += distance_mm * np.cos(angles) / spacing[:, 1]
    truth["y"] += distance_mm * np.sin(angles) / spacing[:, 0]
    return truth


def moved_point_costs(work, script_path, config_path, true_score, distances=(1.0, 2.0), draws=(1, 2), grading=()):
    """{"1 mm": [cost of each draw], ...}: the score at the moved true points minus the score at the true ones. Their
    crops are cut once and kept in `work`; `grading` options go to predict."""
    root, costs = work / "competition", {}
    for distance in distances:
        for draw in draws:
            moved_dir = work / f"moved_{distance:g}mm_{draw}"
            if not (moved_dir / "prepared").is_dir():
                moved = moved_dir / "coordinates.csv"
                moved_dir.mkdir(parents=True, exist_ok=True)
                moved_points(root, distance, draw).to_csv(moved, index=False)
                prepare = ["prepare", "--competition-dir", root, "--out-dir", moved_dir / "prepared", "--split", "test"]
                run(script_path, *prepare, "--coordinates", moved)
            graded = moved_dir / "graded"
            run(script_path, *predict_into(work, moved_dir / "prepared", graded, grading))
            score, _ = scores(root, graded / "submission.csv", config_path)
            costs.setdefault(f"{distance:g} mm", []).append(score - true_score)
    return costs


def predict_into(work, data_dir, output_dir, grading=()):
    """Clears output_dir; returns the arguments of script.py's predict with the check's severity model into it."""
    shutil.rmtree(output_dir, ignore_errors=True)
    return [
        "predict",
        "--model",
        work / "out" / "model.keras",
        "--data-dir",
        data_dir,
        "--output-dir",
        output_dir,
        *grading,
    ]


def regrade(work, script_path):
    """An earlier check's models, its found points (from the DICOMs, as the check predicts), true points and moved
    true points graded again, each crop alone and with its mirror image: {grading: scores and costs}."""
    root, config, results = work / "competition", work / "out" / "config.json", {}
    for name, grading in (("alone", ["--no-predict-mirrored"]), ("mirrored", ["--predict-mirrored"])):
        found, true = work / f"regraded_{name}" / "found", work / f"regraded_{name}" / "true"
        run(script_path, *predict_into(work, root, found, grading))
        run(script_path, *predict_into(work, work / "true_prepared", true, grading))
        found_score, _ = scores(root, found / "submission.csv", config)
        true_score, _ = scores(root, true / "submission.csv", config)
        results[name] = {
            "score_at_found_points": found_score,
            "score_at_true_points": true_score,
            "cost_of_localisation": found_score - true_score,
            "cost_of_moved_true_points": moved_point_costs(work, script_path, config, true_score, grading=grading),
        }
    return results


def main():
    options = parse_arguments()
    work = options.work or Path(tempfile.mkdtemp(prefix="localiser-check-"))
    work.mkdir(parents=True, exist_ok=True)
    root = work / "competition"
    if not root.exists():
        anatomy_synthetic.main(
            ["--out", str(root), "--seed", str(options.seed), "--train-studies", str(options.train_studies)]
            + ["--test-studies", str(options.test_studies)]
        )
    out, points, out2 = work / "out", work / "pts.csv", work / "out2"
    if options.regrade:
        result = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "commit": commit()}
        result |= regrade(work, options.script)
        record(f"{options.seed}, regraded", result)
        return
    seconds = {
        "train": run(options.script, "--data-dir", root, "--output-dir", out, *TRAIN),
        "localise": run(
            options.script,
            "localise",
            "--model",
            out / "localiser.keras",
            "--competition-dir",
            root,
            "--split",
            "test",
            "--out",
            points,
        ),
        "predict": run(options.script, *predict_into(work, root, out2)),
    }
    true_prepared, true_out = work / "true_prepared", work / "true_out"
    truth = root / "_truth" / "test_label_coordinates.csv"
    run(
        options.script,
        "prepare",
        "--competition-dir",
        root,
        "--out-dir",
        true_prepared,
        "--split",
        "test",
        "--coordinates",
        truth,
    )
    run(options.script, *predict_into(work, true_prepared, true_out))

    submission = pd.read_csv(out2 / "submission.csv", dtype={"row_id": str})
    found_score, constant_score = scores(root, out2 / "submission.csv", out / "config.json")
    true_score, _ = scores(root, true_out / "submission.csv", out / "config.json")
    studies = script.study_ids(submission["row_id"]).value_counts()
    result = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "commit": commit(),
        "seed": options.seed,
        "studies": {"train": options.train_studies, "test": options.test_studies},
        "seconds": seconds,
        "minutes_for_the_three_commands": sum(seconds.values()) / 60,
        "localisation": localisation(root, points),
        "every_study_has_25_rows": bool(len(studies) == options.test_studies and (studies == 25).all()),
        "score_at_found_points": found_score,
        "score_at_true_points": true_score,
        "best_constant_score": constant_score,
        "cost_of_localisation": found_score - true_score,
        "cost_of_moved_true_points": moved_point_costs(work, options.script, out / "config.json", true_score),
    }
    record(str(options.seed), result)


def commit():
    return subprocess.run(
        ["git", "-C", str(REPOSITORY), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()


def record(key, result):
    """Print a result and keep it in RESULTS under `key`."""
    previous = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    previous[key] = result
    RESULTS.write_text(json.dumps(previous, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
