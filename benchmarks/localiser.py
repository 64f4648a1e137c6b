"""
Level-localiser benchmark: the time for one hidden-test study from its DICOM files to its 25 predictions (read the
series, localise, crop, classify) at the default sizes, and the localiser's training time per study and epoch,
against the naive design in the same run.

    python benchmarks/localiser.py                  # 4 synthetic studies at their natural sizes; about 3 minutes
    python benchmarks/localiser.py --studies 8

Ours: every sagittal slice runs through the localiser once (presence picks the slice), and each level's axial slice
is matched by geometry, so the axial series cost three slices per level (the matched one and its neighbours, in one
call per series); timed alone (ours_localise_only) and with the crops and the severity model (ours: predict's own
script.study_predictions, from the DICOM folder to 25 rows, each crop graded with its mirror image as predict does;
ours_crops_alone: each crop graded alone, --no-predict-mirrored). Naive
(naive_localise_only): the localiser runs on every slice of every series, axial ones included. Both use untrained
models, which cost the same as trained ones. Target: ≤ 5 s per study on 2 cores. Writes
benchmarks/localiser_results.json.
"""

import argparse
import json
import platform
import sys
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))
sys.path.insert(0, str(REPOSITORY / "tests"))

import anatomy_synthetic  # noqa: E402
import numpy as np  # noqa: E402

import script  # noqa: E402  (needs the path set up above)

script.import_tensorflow()  # Keras, and script.py's Keras classes, which a plain import leaves out.

RESULTS = REPOSITORY / "benchmarks" / "localiser_results.json"
TARGET_SECONDS = 5.0


def parse_arguments():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--studies", type=int, default=4, help="synthetic test studies to time (default: 4)")
    parser.add_argument("--repeats", type=int, default=1, help="passes over the studies (default: 1)")
    return parser.parse_args()


def naive_localise(localiser, study):
    """Every slice of every series through the localiser; each point on its highest-presence slice."""
    found = []
    for kind, volumes in study.volumes.items():
        for volume in volumes:
            seen = script.predict_slices(localiser, volume, range(len(volume.images)))
            for channel in script.KIND_CHANNELS[kind]:
                index = int(np.argmax(seen.outputs[:, channel, 2]))
                found.append(script.point_on(seen, index, channel, "naive", "l1_l2"))
    return found


def time_studies(localiser, graders, root, study_ids, image_size, design):
    """Seconds per study. ours: predict's own path, script.study_predictions, from the DICOM folder to 25 rows."""
    series = script.study_series(script.read_series_descriptions(root, "test"))
    images_dir, work_dir = root / "test_images", root / "crops"
    constants = {"": np.full(len(script.CLASS_NAMES), 1 / len(script.CLASS_NAMES))}  # Rows an untrained model misses.
    seconds = []
    for study_id in study_ids:
        started = time.perf_counter()
        if design in graders:
            grader = graders[design]
            script.study_predictions(images_dir, study_id, series[study_id], localiser, grader, constants, work_dir)
        else:
            study = script.read_localiser_study(images_dir, study_id, series[study_id], image_size)
            localise = script.localise_study if design == "ours_localise_only" else naive_localise
            localise(localiser, study)
        seconds.append(time.perf_counter() - started)
    return seconds


def main():
    options = parse_arguments()
    root = Path(tempfile.mkdtemp(prefix="localiser-bench-"))
    competition = anatomy_synthetic.write_anatomical_competition(root / "competition", 1, options.studies, seed=11)
    root = competition.root
    size = script.LOCALISER_IMAGE_SIZE
    localiser = script.Localiser(script.build_localiser(size, None, from_scratch=True), level_offsets_mm=None)
    model = script.build_model(script.IMAGE_SIZE, None, from_scratch=True)
    graders = {
        "ours": script.Grader([model], script.BATCH_SIZE, mirrored=script.PREDICT_MIRRORED),
        "ours_crops_alone": script.Grader([model], script.BATCH_SIZE, mirrored=False),
    }
    study_ids = [str(study_id) for study_id in competition.test_study_ids]
    for design in [*graders, "naive_localise_only"]:  # Warm-up: tracing, caches.
        time_studies(localiser, graders, root, study_ids[:1], size, design)
    # ours: DICOM → 25 predictions; the localise_only two stop after localising, so they compare like with like.
    results = {"ours": [], "ours_crops_alone": [], "ours_localise_only": [], "naive_localise_only": []}
    for _ in range(options.repeats):
        for design in results:
            results[design] += time_studies(localiser, graders, root, study_ids, size, design)

    # Training cost: one epoch on the study set (one slice per study and series kind), after a warm-up epoch.
    coordinates = script.read_coordinates(root / "train_label_coordinates.csv")
    train_series = script.study_series(script.read_series_descriptions(root, "train"))
    studies = [
        script.read_localiser_study(
            root / "train_images",
            study_id,
            train_series[study_id],
            size,
            coordinates[coordinates["study_id"] == study_id],
        )
        for study_id in sorted(train_series)
    ] * 8
    _, options = script.parse_arguments([])
    settings = replace(
        script.localiser_settings(options), localiser_slices_per_study=1, localiser_min_slices_per_epoch=0
    )
    batches = script.LocaliserBatches(studies, settings, 0, augment=True, workers=2)
    trainer = script.localiser_trainer(localiser.model)
    trainer.compile(optimizer="adam", loss=[script.localiser_loss, script.heatmap_loss])
    trainer.fit(batches, epochs=1, verbose=0)
    started = time.perf_counter()
    trainer.fit(batches, epochs=1, verbose=0)
    per_slice = (time.perf_counter() - started) / len(batches.items)

    report = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {script.os.cpu_count()} cores",
        "localiser_image_size": size,
        "severity_image_size": script.IMAGE_SIZE,
        "studies": len(study_ids),
        "seconds_per_study_median": {design: float(np.median(values)) for design, values in results.items()},
        "target_seconds_per_study": TARGET_SECONDS,
        "training_seconds_per_slice": per_slice,
        "training_seconds_per_epoch_of_80_studies": per_slice * 80 * 3 * script.LOCALISER_SLICES_PER_STUDY,
    }
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
