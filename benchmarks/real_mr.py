"""
The level localiser on real MR (issue 25), cross-validated over the 30 real lumbar volumes with disc points.

    python benchmarks/real_mr.py                                     # 5 folds, ~18 minutes each on 2 cores
    python benchmarks/real_mr.py --script /tmp/baseline/script.py    # measure another copy of script.py
    python benchmarks/real_mr.py --other-contrast inverted           # also the test studies in a simulated contrast
    python benchmarks/real_mr.py --work-dir W --keep --resume --test-seeds 1,2,3,7   # kept folds, other builds
    python benchmarks/real_mr.py --work-dir W --keep --resume --relocalise --test-seeds 1,2,3,7   # a new decoding
    python benchmarks/real_mr.py --folds 5 --only-folds 1 -- --localiser-epochs 10   # extra training options after --

Each fold builds a competition folder with tests/real_mr_competition.py (train: the other subjects; test: the fold's,
Sagittal T2/STIR only; see that module for the slices, pixels and geometry and why), then runs the project's own
commands as a user would:

    python SCRIPT --data-dir COMP --output-dir OUT --weights none --image-size 64 --epochs 1 --fine-tune-epochs 0
                  --localiser-epochs 30 [extra options]
    python SCRIPT localise --model OUT/localiser.keras --competition-dir COMP --split test --out OUT/points.csv

and compares the points with the truth (COMP/_truth), in world mm from the DICOM tags. Pooled over every tested
study: the median and 90th-percentile distance, the share within 5 and 10 mm, the share on a slice within one
instance of the labelled one; per study: levels on the wrong disc (a found point whose nearest true disc point is
another level's), two levels on one disc (two found levels sharing their nearest true disc), the chain counted one
level off (two or more consecutive levels whose nearest true disc is each the next, or each the previous, level's),
and levels on no labelled disc (nearest their own disc, but further from it than half the way to its nearest
neighbour: on T12/L1, the sacrum, or nowhere near the spine). Writes benchmarks/real_mr_results.json and prints a
markdown table. With --test-seeds, each fold's localiser also localises its test subjects built again with each of
those builder seeds (other slice spacings, phases, pixel sizes and origins: builds its decoding was not tuned on),
pooled per seed and over them all. Needs the data (SPINE_MR_DIR, else <repository>/../shared/real/spine_mr); runs
one training at a time.
"""

import argparse
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY / "tests"))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pydicom  # noqa: E402
import real_mr_competition as R  # noqa: E402  (brings script's task facts too)

from script import LEVELS  # noqa: E402

RESULTS = REPOSITORY / "benchmarks" / "real_mr_results.json"
TRAIN_OPTIONS = "--weights none --image-size 64 --epochs 1 --fine-tune-epochs 0 --localiser-epochs 30"
LEVEL_NAMES = [R.level_name(level) for level in LEVELS]


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.strip().splitlines()[0], allow_abbrev=False, epilog="Options after -- go to training."
    )
    parser.add_argument("--script", type=Path, default=REPOSITORY / "script.py", help="the script.py to measure")
    parser.add_argument("--folds", type=int, default=5, help="K: each subject is tested once (default 5)")
    parser.add_argument("--only-folds", default="", help="run only these folds, counted from 1 (e.g. 1,3)")
    parser.add_argument("--subjects", default="0-29", help="subjects to cross-validate over (default 0-29)")
    parser.add_argument("--seed", type=int, default=0, help="the builder's seed: slice spacing, phase, pixels")
    parser.add_argument("--train-options", default=TRAIN_OPTIONS, help=f"training options (default: {TRAIN_OPTIONS})")
    parser.add_argument("--localise-options", default="", help="extra options for the localise command")
    parser.add_argument(
        "--other-contrast",
        nargs="?",
        const="inverted",
        choices=[name for name in R.CONTRASTS if name != "water"],
        help="also localise the test studies rendered in a simulated other contrast (default: inverted)",
    )
    parser.add_argument(
        "--test-seeds",
        default="",
        help="also localise each fold's test subjects built with these builder seeds (e.g. 1,2,3,7)",
    )
    parser.add_argument("--work-dir", type=Path, default=None, help="where folds are built and run (default: temp)")
    parser.add_argument("--keep", action="store_true", help="keep each fold's competition and outputs")
    parser.add_argument("--resume", action="store_true", help="reuse folds already measured in --work-dir")
    parser.add_argument(
        "--relocalise",
        action="store_true",
        help="with --resume: localise again with --script (its decoding), on each kept fold's test split and builds",
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help=f"JSON to write (default: {RESULTS})")
    arguments, extra = parser.parse_known_args(argv)
    if extra and extra[0] == "--":
        extra = extra[1:]
    arguments.extra = extra
    if arguments.relocalise and not (arguments.resume and arguments.keep):
        parser.error("--relocalise needs --resume and --keep: it localises again with the kept folds' localisers")
    return arguments


def run(command, log_path):
    """Run a command, its output to a log; refuse with the log's tail if it fails. Returns seconds."""
    started = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + shlex.join(command) + "\n")
        log.flush()
        environment = dict(os.environ, PYTHONUNBUFFERED="1")
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
    if code != 0:
        tail = "".join(Path(log_path).read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"command failed ({code}): {shlex.join(command)}\n{tail}")
    return time.perf_counter() - started


def found_points(points_path, images_dir):
    """The found canal points as {(study_id, level): (instance_number, world)} from a localise CSV."""
    found = {}
    table = pd.read_csv(points_path)
    table = table[table["condition"].str.lower() == "spinal canal stenosis"]
    for row in table.itertuples():
        path = images_dir / str(row.study_id) / str(row.series_id) / f"{int(row.instance_number)}.dcm"
        header = pydicom.dcmread(path, stop_before_pixels=True)
        position = np.array(header.ImagePositionPatient, float)
        orientation = np.array(header.ImageOrientationPatient, float)
        row_spacing, column_spacing = (float(value) for value in header.PixelSpacing)
        world = position + row.x * column_spacing * orientation[:3] + row.y * row_spacing * orientation[3:]
        found[(int(row.study_id), row.level)] = (int(row.instance_number), world)
    return found


def longest_shifted_run(shifts):
    """The longest run of consecutive levels sharing one shift of +1 or -1 (None: not placed)."""
    best, length, previous = 0, 0, None
    for shift in shifts:
        length = length + 1 if shift in (-1, 1) and shift == previous else (1 if shift in (-1, 1) else 0)
        previous = shift
        best = max(best, length)
    return best


def measure(points_path, competition_dir):
    """(point rows, study rows) comparing a localise CSV with the truth of a competition folder."""
    truth = pd.read_csv(competition_dir / "_truth" / "test_label_coordinates.csv")
    found = found_points(points_path, competition_dir / "test_images")
    point_rows, study_rows = [], []
    for study_id, study in truth.groupby("study_id", sort=True):
        study = study.set_index("level").loc[LEVEL_NAMES]
        true_worlds = study[["world_x", "world_y", "world_z"]].to_numpy(float)
        shifts, nearest_levels, errors, wrong, no_disc = [], [], [], [], []
        for number, level in enumerate(LEVEL_NAMES):
            item = found.get((int(study_id), level))
            if item is None:
                shifts.append(None)
                point_rows.append({"study_id": int(study_id), "level": level, "placed": False})
                continue
            instance, world = item
            distances = np.linalg.norm(true_worlds - world, axis=1)
            nearest = int(np.argmin(distances))
            neighbours = np.linalg.norm(np.delete(true_worlds, number, axis=0) - true_worlds[number], axis=1)
            shifts.append(nearest - number)
            nearest_levels.append(nearest)
            errors.append(float(distances[number]))
            if nearest != number:
                wrong.append(level)
            elif distances[number] > 0.5 * neighbours.min():
                no_disc.append(level)
            point_rows.append(
                {
                    "study_id": int(study_id),
                    "level": level,
                    "placed": True,
                    "mm": float(distances[number]),
                    "slice_off": int(abs(instance - int(study.loc[level, "instance_number"]))),
                    "nearest_disc": LEVEL_NAMES[nearest],
                    "offset_mm": [round(float(value), 2) for value in world - true_worlds[number]],  # LPS: +z head.
                }
            )
        study_rows.append(
            {
                "study_id": int(study_id),
                "subject": int(study["subject"].iloc[0]),
                "name": str(study["name"].iloc[0]),
                "placed": len(errors),
                "median_mm": float(np.median(errors)) if errors else None,
                "wrong_disc": len(wrong),
                "wrong_disc_levels": wrong,
                "two_on_one_disc": len(set(nearest_levels)) < len(nearest_levels),
                "chain_one_level_off": longest_shifted_run(shifts) >= 2,
                "shifts": shifts,
                "no_disc_levels": no_disc,
            }
        )
    return point_rows, study_rows


def summary(point_rows, study_rows):
    """The issue's table, pooled: unplaced points count as neither within 5 or 10 mm nor within one slice."""
    points = pd.DataFrame(point_rows)
    placed = points[points["placed"]]
    expected = len(points)
    per_level = {level: float(part["mm"].median()) for level, part in placed.groupby("level")} if len(placed) else {}
    return {
        "studies": len(study_rows),
        "points": expected,
        "placed": len(placed),
        "median_mm": float(placed["mm"].median()) if len(placed) else None,
        "p90_mm": float(np.percentile(placed["mm"], 90)) if len(placed) else None,
        "within_5mm": float((placed["mm"] <= 5).sum() / expected),
        "within_10mm": float((placed["mm"] <= 10).sum() / expected),
        "slice_within_one": float((placed["slice_off"] <= 1).sum() / expected),
        "on_labelled_slice": float((placed["slice_off"] == 0).sum() / expected),
        "studies_with_wrong_disc": sum(row["wrong_disc"] > 0 for row in study_rows),
        "levels_on_wrong_disc": sum(row["wrong_disc"] for row in study_rows),
        "studies_with_two_on_one_disc": sum(row["two_on_one_disc"] for row in study_rows),
        "studies_with_chain_one_level_off": sum(row["chain_one_level_off"] for row in study_rows),
        "studies_with_level_on_no_disc": sum(bool(row["no_disc_levels"]) for row in study_rows),
        "median_mm_by_level": {level: per_level.get(level) for level in LEVEL_NAMES},
    }


def markdown(results):
    """The issue's table, then one row per study."""
    lines = [
        "| build | studies | median | p90 | ≤ 5 mm | ≤ 10 mm | slice within one | on labelled slice "
        "| studies with a level on the wrong disc | two levels on one disc | chain one level off "
        "| a level on no labelled disc |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    rows = [("water (as trained)", results.get("water"))]
    if results.get("other_contrast"):
        rows.append((f"{results['other_contrast_name']} (simulated proxy)", results["other_contrast"]))
    for seed, figures in results.get("other_builds", {}).items():
        label = "other builds, pooled" if seed == "pooled" else f"water, built with seed {seed}"
        rows.append((label, figures))
    for label, figures in rows:
        lines.append(
            f"| {label} | {figures['studies']} | {figures['median_mm']:.1f} mm | {figures['p90_mm']:.1f} mm "
            f"| {figures['within_5mm']:.0%} | {figures['within_10mm']:.0%} | {figures['slice_within_one']:.0%} "
            f"| {figures['on_labelled_slice']:.0%} | {figures['studies_with_wrong_disc']} of {figures['studies']} "
            f"| {figures['studies_with_two_on_one_disc']} | {figures['studies_with_chain_one_level_off']} "
            f"| {figures['studies_with_level_on_no_disc']} |"
        )
    by_level = results["water"]["median_mm_by_level"]
    lines += [
        "",
        "Median by level (water): "
        + ", ".join(f"{level} {value:.1f} mm" for level, value in by_level.items() if value),
        "",
        "| fold | subject | study | placed | median mm | wrong disc | two on one disc | chain off "
        "| on no labelled disc | shifts |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in results["studies"]:
        shifts = " ".join("·" if shift is None else f"{shift:+d}" for shift in row["shifts"])
        median = f"{row['median_mm']:.1f}" if row["median_mm"] is not None else "-"
        lines.append(
            f"| {row['fold']} | {row['subject']} ({row['name']}) | {row['study_id']} | {row['placed']} | {median} "
            f"| {', '.join(row['wrong_disc_levels']) or '-'} | {'yes' if row['two_on_one_disc'] else '-'} "
            f"| {'yes' if row['chain_one_level_off'] else '-'} | {', '.join(row['no_disc_levels']) or '-'} "
            f"| {shifts} |"
        )
    return "\n".join(lines)


def run_fold(arguments, data, fold, subjects, test, work_dir):
    """Build, train, localise and measure one fold; returns its record (also saved in its folder)."""
    fold_dir = work_dir / f"fold{fold}"
    record_path = fold_dir / "fold.json"
    if arguments.resume and record_path.is_file():
        print(f"fold {fold}: reusing {record_path}", flush=True)
        record = json.loads(record_path.read_text())
        if arguments.relocalise:
            relocalise(arguments, fold_dir, record)
        if add_other_builds(arguments, data, fold_dir, record) or arguments.relocalise:
            record_path.write_text(json.dumps(record, indent=2))
        return record
    shutil.rmtree(fold_dir, ignore_errors=True)
    fold_dir.mkdir(parents=True)
    train = [subject for subject in subjects if subject not in test]
    seconds = {}
    started = time.perf_counter()
    competition = fold_dir / "competition"
    R.write_real_mr_competition(competition, train, test, seed=arguments.seed, data=data)
    seconds["build"] = time.perf_counter() - started
    output = fold_dir / "output"
    python, script = sys.executable, str(arguments.script)
    train_command = [
        python,
        script,
        "--data-dir",
        str(competition),
        "--output-dir",
        str(output),
        *shlex.split(arguments.train_options),
        *arguments.extra,
    ]
    print(f"fold {fold}: train {len(train)}, test {test}; training ({fold_dir / 'train.log'})", flush=True)
    seconds["train"] = run(train_command, fold_dir / "train.log")
    model = output / "localiser.keras"

    def localise(competition_dir, points_path, log_name):
        command = localise_command(arguments, model, competition_dir, points_path)
        return command, run(command, fold_dir / log_name)

    localised, seconds["localise"] = localise(competition, output / "points.csv", "localise.log")
    point_rows, study_rows = measure(output / "points.csv", competition)
    record = {
        "fold": fold,
        "train_subjects": train,
        "test_subjects": test,
        "commands": [shlex.join(train_command), shlex.join(localised)],
        "points": point_rows,
        "studies": study_rows,
    }
    if arguments.other_contrast:
        other = fold_dir / f"competition_{arguments.other_contrast}"
        R.write_real_mr_competition(other, [], test, seed=arguments.seed, contrast=arguments.other_contrast, data=data)
        _, seconds["localise_other"] = localise(other, output / "points_other.csv", "localise_other.log")
        record["other_points"], record["other_studies"] = measure(output / "points_other.csv", other)
    add_other_builds(arguments, data, fold_dir, record)
    record["seconds"] = {key: round(value, 1) for key, value in seconds.items()}
    record["seconds"]["fold"] = round(time.perf_counter() - started, 1)
    record_path.write_text(json.dumps(record, indent=2))
    if not arguments.keep:
        for path in fold_dir.iterdir():
            if path.is_dir():
                shutil.rmtree(path)
    figures = summary(point_rows, study_rows)
    print(
        f"fold {fold}: median {figures['median_mm']:.1f} mm, ≤10 mm {figures['within_10mm']:.0%}, wrong disc in "
        f"{figures['studies_with_wrong_disc']} of {figures['studies']} studies ({record['seconds']['fold']:.0f} s)",
        flush=True,
    )
    return record


def localise_command(arguments, model, competition_dir, points_path):
    """The project's localise command for a competition's test split, as a user runs it."""
    command = [sys.executable, str(arguments.script), "localise", "--model", str(model)]
    command += ["--competition-dir", str(competition_dir), "--split", "test", "--out", str(points_path)]
    return command + shlex.split(arguments.localise_options)


def other_build_seeds(arguments):
    """The --test-seeds, as strings (the keys of a record's other_builds)."""
    return {str(seed) for seed in R.parse_subjects(arguments.test_seeds)}


def relocalise(arguments, fold_dir, record):
    """Localise a kept fold's test split again with --script and its kept localiser, and forget its other builds'
    figures, so that add_other_builds localises them again too: a change of decoding measured without training."""
    model, competition = fold_dir / "output" / "localiser.keras", fold_dir / "competition"
    if not (model.is_file() and competition.is_dir()):
        raise SystemExit(f"{fold_dir}: no kept localiser and competition; --relocalise needs folds run with --keep")
    points = fold_dir / "output" / "points.csv"
    command = localise_command(arguments, model, competition, points)
    run(command, fold_dir / "localise.log")
    record["points"], record["studies"] = measure(points, competition)
    record["commands"][1] = shlex.join(command)
    record.pop("other_builds", None)


def add_other_builds(arguments, data, fold_dir, record):
    """Localise the fold's test subjects built with each --test-seeds seed not yet in the record, with the fold's
    kept localiser; records {seed: {"points", "studies"}} in record["other_builds"] and returns the seeds added."""
    model = fold_dir / "output" / "localiser.keras"
    wanted = sorted(other_build_seeds(arguments) - set(record.get("other_builds", {})), key=int)
    if wanted and not model.is_file():
        raise SystemExit(f"{model}: not found; --test-seeds needs each fold's localiser (train with --keep)")
    for seed in wanted:
        competition = fold_dir / f"competition_seed{seed}"
        shutil.rmtree(competition, ignore_errors=True)
        R.write_real_mr_competition(competition, [], record["test_subjects"], seed=int(seed), data=data)
        points = competition / "points.csv"
        run(localise_command(arguments, model, competition, points), fold_dir / f"localise_seed{seed}.log")
        point_rows, study_rows = measure(points, competition)
        record.setdefault("other_builds", {})[seed] = {"points": point_rows, "studies": study_rows}
        if not arguments.keep:
            shutil.rmtree(competition)
    return wanted


def other_builds_summary(records, seeds):
    """{seed: summary, ..., "pooled": summary} over the folds' other builds."""
    figures, pooled_points, pooled_studies = {}, [], []
    for seed in sorted(seeds, key=int):
        builds = [(record["fold"], record["other_builds"][seed]) for record in records]
        points = [row | {"fold": fold} for fold, build in builds for row in build["points"]]
        studies = [row | {"fold": fold} for fold, build in builds for row in build["studies"]]
        figures[seed] = summary(points, studies)
        pooled_points += points
        pooled_studies += studies
    figures["pooled"] = summary(pooled_points, pooled_studies)
    return figures


def git(*arguments):
    """A git command's output in the repository, stripped; None if git fails."""
    try:
        command = ["git", "-C", str(REPOSITORY), *arguments]
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def script_commit(path):
    """The commit that wrote the measured script.py as it is, byte for byte (the newest such); None if none did, as
    for a working copy with uncommitted changes. HEAD can move during a long run; this cannot."""
    blob = git("hash-object", str(path))
    for commit in (git("log", "--format=%H", "--", "script.py") or "").split():
        if blob and git("rev-parse", f"{commit}:script.py") == blob:
            return commit
    return None


def main(argv=None):
    arguments = parse_arguments(argv)
    arguments.script = arguments.script.resolve()
    if not arguments.script.is_file():
        raise SystemExit(f"--script {arguments.script}: not found")
    if R.data_path() is None:
        raise SystemExit(f"real MR data absent: no {R.DATA_FILE} in {R.data_dir()} (set SPINE_MR_DIR)")
    subjects = R.parse_subjects(arguments.subjects)
    if not 2 <= arguments.folds <= len(subjects):
        raise SystemExit(f"--folds must be 2 to {len(subjects)}")
    folds = [list(map(int, part)) for part in np.array_split(subjects, arguments.folds)]
    chosen = R.parse_subjects(arguments.only_folds) or list(range(1, arguments.folds + 1))
    work_dir = arguments.work_dir or Path(tempfile.mkdtemp(prefix="real_mr_benchmark-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    data = R.load_data()
    commit, measured_commit = git("rev-parse", "HEAD"), script_commit(arguments.script)
    started = time.perf_counter()
    records = [run_fold(arguments, data, fold, subjects, folds[fold - 1], work_dir) for fold in chosen]
    point_rows = [row | {"fold": record["fold"]} for record in records for row in record["points"]]
    study_rows = [row | {"fold": record["fold"]} for record in records for row in record["studies"]]
    results = {
        "benchmark": "benchmarks/real_mr.py",
        "command": shlex.join([Path(sys.executable).name, "benchmarks/real_mr.py", *(argv or sys.argv[1:])]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "script": str(arguments.script),
        "script_commit": measured_commit,
        "script_sha256": hashlib.sha256(arguments.script.read_bytes()).hexdigest(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "seed": arguments.seed,
        "folds": arguments.folds,
        "folds_run": chosen,
        "fold_subjects": {str(fold): folds[fold - 1] for fold in chosen},
        "commands_fold1": records[0]["commands"] if records else [],
        "seconds_per_fold": {str(record["fold"]): record["seconds"] for record in records},
        "seconds_total": round(time.perf_counter() - started, 1),
        "water": summary(point_rows, study_rows),
        "studies": study_rows,
        "points": point_rows,
    }
    if arguments.other_contrast:
        other_points = [row | {"fold": record["fold"]} for record in records for row in record.get("other_points", [])]
        other_studies = [
            row | {"fold": record["fold"]} for record in records for row in record.get("other_studies", [])
        ]
        results["other_contrast_name"] = arguments.other_contrast
        results["other_contrast"] = summary(other_points, other_studies) if other_points else None
        results["other_contrast_studies"] = other_studies
    seeds = other_build_seeds(arguments)
    if seeds:
        results["other_builds"] = other_builds_summary(records, seeds)
    results["markdown"] = markdown(results)
    arguments.results.parent.mkdir(parents=True, exist_ok=True)
    arguments.results.write_text(json.dumps(results, indent=2) + "\n")
    if not arguments.keep and not arguments.work_dir:
        shutil.rmtree(work_dir, ignore_errors=True)
    print()
    print(results["markdown"])
    print(f"\nwrote {arguments.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
