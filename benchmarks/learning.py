"""
Learning benchmark: does training from random weights (--weights none, the only choice offline) learn, and how
does it compare with the naive seed design (benchmarks/naive.py: a frozen random base, inputs / 255, no class
weights) on the same data, in the same run?

    python benchmarks/learning.py                      # every dataset below; about 25 minutes on 2 cores
    python benchmarks/learning.py --only squares       # one dataset: squares, sample, photos

Datasets, each with held-out test labels:
    squares   the learning check of tests/test_learning.py (tests/synthetic.py's squares), with its flags;
    sample    the shipped sample's generator (16 + 4 studies, 64 px) with the README's quick-run flags;
    photos    real photographs at 64 px, 380 training and 60 test images, three classes by source: crops of
              scikit-learn's two sample photographs (china.jpg, flower.jpg) and of the real MRI slices in
              ../shared/real/sagittal_mri_png when present (else a grayscale china.jpg), run as the learning
              issue's hidden check runs: --weights none --image-size 64 --epochs 5 --fine-tune-epochs 3 --seed 1.

Per dataset and design it reports the held-out test accuracy and score (the competition metric; for plain
row_ids the class-weighted log loss), the best constant's test score, and for script.py the validation score,
its best constant and the first epoch whose validation accuracy reaches the learning check's bar. Prints a table
and writes benchmarks/learning_results.json.
"""

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))
sys.path.insert(0, str(REPOSITORY / "tests"))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import synthetic  # noqa: E402
from sklearn.datasets import load_sample_images  # noqa: E402
from test_learning import LEARNING_RUN, MINIMUM_ACCURACY  # noqa: E402

import script  # noqa: E402  (needs the path set up above)

DATASETS = ("squares", "sample", "photos")
SAMPLE_RUN = [
    "--weights",
    "none",
    "--image-size",
    "64",
    "--epochs",
    "8",
    "--fine-tune-epochs",
    "2",
    "--batch-size",
    "16",
]  # The README's quick run.
PHOTOS_RUN = ["--weights", "none", "--image-size", "64", "--epochs", "5", "--fine-tune-epochs", "3", "--seed", "1"]
REAL_MRI = REPOSITORY.parent / "shared" / "real" / "sagittal_mri_png"
RESULTS = REPOSITORY / "benchmarks" / "learning_results.json"


def write_photos(root, train_rows=380, test_rows=60, image_size=64, seed=1):
    """Three classes of real-photograph crops (see the module docstring), seed layout with test_labels.csv."""
    rng = np.random.default_rng(seed)
    china, flower = (cv2.cvtColor(image, cv2.COLOR_RGB2BGR) for image in load_sample_images().images)
    mri = [cv2.imread(str(path)) for path in sorted(REAL_MRI.glob("*.png"))]
    third = mri if mri else [cv2.cvtColor(cv2.cvtColor(china, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)]
    sources = ([china], [flower], third)
    rows = []
    for index in range(train_rows + test_rows):
        label = index % 3
        source = sources[label][rng.integers(len(sources[label]))]
        height, width = source.shape[:2]
        side = int(rng.uniform(0.35, 0.7) * min(height, width))
        top, left = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
        crop = cv2.resize(
            source[top : top + side, left : left + side], (image_size, image_size), interpolation=cv2.INTER_AREA
        )
        split = "train" if index < train_rows else "test"
        path = f"images/{split}/photo_{index:04d}.png"
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / path), crop)
        rows.append((f"photo_{index:04d}", path, label, split))
    table = pd.DataFrame(rows, columns=["row_id", "image_path", "label", "split"])
    for class_index, name in enumerate(script.CLASS_NAMES):
        table[name] = (table["label"] == class_index).astype(int)
    train, test = table[table["split"] == "train"], table[table["split"] == "test"]
    train[["row_id", "image_path", *script.CLASS_NAMES]].to_csv(root / "train.csv", index=False)
    test[["row_id", "image_path"]].to_csv(root / "test.csv", index=False)
    test[["row_id", *script.CLASS_NAMES]].to_csv(root / "test_labels.csv", index=False)
    return "real MRI slices" if mri else "grayscale china.jpg"


def make_dataset(name, root):
    """Write one dataset; returns (the run's flags, a note on what it is)."""
    if name == "squares":
        synthetic.make_squares_dataset(root, seed=0)
        return LEARNING_RUN, "tests/test_learning.py's check"
    if name == "sample":
        synthetic.make_dataset(
            root,
            train_studies=synthetic.SAMPLE_TRAIN_STUDIES,
            test_studies=4,
            image_size=synthetic.SAMPLE_IMAGE_SIZE,
            seed=0,
            write_test_labels=True,
        )
        return SAMPLE_RUN, "the sample's generator, README quick run"
    third = write_photos(root)
    return PHOTOS_RUN, f"china / flower / {third}"


def flag(flags, name, default):
    return flags[flags.index(name) + 1] if name in flags else default


def naive_flags(flags):
    """The same image size and epochs for the naive design (it has no other options)."""
    return [
        "--image-size",
        flag(flags, "--image-size", "224"),
        "--epochs",
        flag(flags, "--epochs", "5"),
        "--fine-tune-epochs",
        flag(flags, "--fine-tune-epochs", "3"),
    ]


def test_figures(data_dir, submission_path):
    """Held-out accuracy, score, and the best constant's score (from the training labels) on the test rows."""
    truth = pd.read_csv(data_dir / "test_labels.csv", dtype={"row_id": str})
    submission = pd.read_csv(submission_path, dtype={"row_id": str}).set_index("row_id").loc[truth["row_id"]]
    predicted = submission[list(script.CLASS_NAMES)].to_numpy().argmax(axis=1)
    true = truth[list(script.CLASS_NAMES)].to_numpy().argmax(axis=1)
    train = pd.read_csv(data_dir / "train.csv", dtype={"row_id": str})
    constants = script.best_constants(train[["row_id", *script.CLASS_NAMES]])
    constant = script.probabilities_frame(truth["row_id"], script.constant_predictions(truth["row_id"], constants))
    return {
        "test_accuracy": float(np.mean(predicted == true)),
        "test_score": script.score_predictions(truth, submission.reset_index())["score"],
        "test_best_constant_score": script.score_predictions(truth, constant)["score"],
    }


def run(command, log_path):
    """Run a training command, its output to a log; returns the seconds it took."""
    started = time.perf_counter()
    with open(log_path, "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=REPOSITORY)
    return time.perf_counter() - started


def measure(name, work_dir):
    """Both designs on one dataset."""
    data_dir, ours_dir, naive_dir = work_dir / "data", work_dir / "ours", work_dir / "naive"
    flags, note = make_dataset(name, data_dir)
    print(f"{name}: {note}; script.py {' '.join(flags)}", file=sys.stderr, flush=True)
    ours_seconds = run(
        [sys.executable, "script.py", *flags, "--data-dir", str(data_dir), "--output-dir", str(ours_dir)],
        work_dir / "ours.log",
    )
    metrics = json.loads((ours_dir / "metrics.json").read_text())
    history = pd.read_csv(ours_dir / "history.csv")
    reached = history.index[history["val_accuracy"] >= MINIMUM_ACCURACY]
    ours = {
        "seconds": ours_seconds,
        **test_figures(data_dir, ours_dir / "submission.csv"),
        "validation_score": metrics["score"],
        "validation_best_constant_score": metrics["best_constant_score"],
        "validation_accuracy": metrics["accuracy"],
        "epochs_to_validation_accuracy_bar": int(reached[0]) + 1 if len(reached) else None,
        "epochs": len(history),
    }
    print(f"{name}: naive design", file=sys.stderr, flush=True)
    naive_seconds = run(
        [
            sys.executable,
            "benchmarks/naive.py",
            *naive_flags(flags),
            "--data-dir",
            str(data_dir),
            "--output-dir",
            str(naive_dir),
        ],
        work_dir / "naive.log",
    )
    naive = {"seconds": naive_seconds, **test_figures(data_dir, naive_dir / "submission.csv")}
    return {"dataset": name, "what": note, "flags": flags, "ours": ours, "naive": naive}


def print_table(results):
    print(
        f"\n{'dataset':<9}{'design':<8}{'test acc':>9}{'test score':>11}{'constant':>9}{'val score':>10}"
        f"{'constant':>9}{'epochs to bar':>14}{'seconds':>9}"
    )
    for result in results:
        for design in ("ours", "naive"):
            figures = result[design]
            validation = (
                f"{figures['validation_score']:>10.3f}{figures['validation_best_constant_score']:>9.3f}"
                f"{str(figures['epochs_to_validation_accuracy_bar']):>14}"
                if design == "ours"
                else f"{'':>10}{'':>9}{'':>14}"
            )
            print(
                f"{result['dataset']:<9}{design:<8}{figures['test_accuracy']:>9.3f}{figures['test_score']:>11.3f}"
                f"{figures['test_best_constant_score']:>9.3f}{validation}{figures['seconds']:>9.0f}"
            )
    print(f"(epochs to bar: the first epoch whose validation accuracy reaches {MINIMUM_ACCURACY})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--only", default=",".join(DATASETS), help="comma-separated datasets: " + ", ".join(DATASETS))
    options = parser.parse_args(argv)
    names = [name.strip() for name in options.only.split(",")]
    unknown = sorted(set(names) - set(DATASETS))
    if unknown:
        parser.error(f"unknown dataset(s) {', '.join(unknown)}; choose from {', '.join(DATASETS)}")
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in names:
            results.append(measure(name, Path(scratch) / name))
    print_table(results)
    RESULTS.write_text(
        json.dumps(
            {
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "machine": {
                    "processor": platform.processor() or platform.machine(),
                    "cpus": __import__("os").cpu_count(),
                },
                "results": results,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
