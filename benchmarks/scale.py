"""
Scale benchmark: how a training run reads the competition's DICOMs, at real sizes, against the design before it
(commit 618c506) in the same run: reads and decodes per file, seconds per study for each reading stage, peak memory,
and the extrapolation to the competition (1,975 training and 1,500 test studies) on Kaggle's 4 cores.

    python benchmarks/scale.py                       # 20, 40 and 80 studies; about 25 minutes on 2 cores
    python benchmarks/scale.py --studies 20          # one size

The synthetic competition (tests/anatomy_synthetic.py) is written at 512 px, 15-19 sagittal slices a series and
33-50 axial slices a stack, and then given what real studies have and the phantoms lack: in one study in five, a
second Axial T2 series of 200 slices; in one in five, its Sagittal T1 series at 1024 x 1024 (its labels scaled); in
one in five, a Sagittal T2/STIR slice of another size than its series' (a sub-stack of its own). A test study gets
one test study for every four training ones.

The stages, each timed in its own process with --workers 2 (decoding_pool):
- train: the training studies' labelled crops and the localiser's slice cache (at 128 px);
- test slices: the test studies' slice cache, which the localiser reads;
- test crops: the crops at the test studies' points (the true ones stand in for the found ones).
New: one pass over each training study makes both; the crops at found points take the stacks from the cache.
Old: prepare reads every file's tags, then the labelled slices; the cache reads every file's tags and then its
pixels; the test crops read every file's tags again. Reads and decodes are counted on the smallest size with one
worker (a thread), where every read can be seen. The localiser's and the severity model's training are not here:
the time estimate that a long run prints measures them. Writes benchmarks/scale_results.json.
"""

import argparse
import contextlib
import io
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY / "tests"))

RESULTS = REPOSITORY / "benchmarks" / "scale_results.json"
OLD_COMMIT = "618c506"
IMAGE_SIZE = 512
LONG_AXIAL_SLICES = 200
LOCALISER_SIZE = 128
WORKERS = 2
REPEATS = 2  # each stage's best of this many runs, the designs taking turns
KAGGLE_CORES, TRAIN_STUDIES, TEST_STUDIES = 4, 1975, 1500
STAGES = ("train", "test slices", "test crops")


def parse_arguments():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--studies", type=int, nargs="+", default=[20, 40, 80], help="training studies per size")
    parser.add_argument("--work", type=Path, help="folder for the competitions (default: a temporary one)")
    parser.add_argument("--stage", nargs=4, metavar=("DESIGN", "ROOT", "OUT", "STAGE"), help=argparse.SUPPRESS)
    parser.add_argument("--count", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


# == the competition at real sizes ==


def write_competition(root, studies):
    import anatomy_synthetic

    anatomy_synthetic.write_anatomical_competition(
        root, studies, max(1, studies // 4), seed=11, image_size=IMAGE_SIZE, workers=WORKERS
    )
    add_real_sizes(root)


def add_real_sizes(root):
    """A long axial series, a 1024-px series and a slice of another size, each in one study in five."""
    import pandas as pd

    import script

    for split in ("train", "test"):
        listing_path = root / f"{split}_series_descriptions.csv"
        listing = pd.read_csv(listing_path, dtype=str)
        coordinates_path = root / (
            "train_label_coordinates.csv" if split == "train" else "_truth/test_label_coordinates.csv"
        )
        coordinates = pd.read_csv(coordinates_path, dtype={"study_id": str, "series_id": str})
        added = []
        for number, study_id in enumerate(sorted(listing["study_id"].unique())):
            rows = listing[listing["study_id"] == study_id]
            series = dict(zip(rows["series_description"][::-1], rows["series_id"][::-1]))  # Each kind's first one.
            study_dir = root / f"{split}_images" / study_id
            if number % 5 == 0 and "Axial T2" in series:
                new_id = f"{series['Axial T2']}9"
                write_long_axial(script, study_dir / series["Axial T2"], study_dir / new_id)
                added.append({"study_id": study_id, "series_id": new_id, "series_description": "Axial T2"})
            if number % 5 == 1 and "Sagittal T1" in series:
                upsample_series(study_dir / series["Sagittal T1"])
                labelled = (coordinates["study_id"] == study_id) & (coordinates["series_id"] == series["Sagittal T1"])
                coordinates.loc[labelled, ["x", "y"]] = (coordinates.loc[labelled, ["x", "y"]] + 0.5) * 2 - 0.5
            if number % 5 == 2 and "Sagittal T2/STIR" in series:
                files = (study_dir / series["Sagittal T2/STIR"]).glob("*.dcm")
                rescale_file(max(files, key=lambda path: int(path.stem)), 0.75)
        pd.concat([listing, pd.DataFrame(added)]).to_csv(listing_path, index=False)
        coordinates.to_csv(coordinates_path, index=False)


def write_long_axial(script, source_dir, series_dir):
    """A second axial series: LONG_AXIAL_SLICES slices spread evenly over the first one's largest stack."""
    import pydicom

    stack = script.read_stacks(source_dir)[0]
    positions = stack.positions
    for number in range(LONG_AXIAL_SLICES):
        share = number / (LONG_AXIAL_SLICES - 1)
        source = stack.slices[round(share * (len(stack.slices) - 1))]
        dataset = pydicom.dcmread(source.path)
        if dataset.file_meta.TransferSyntaxUID.is_compressed:
            dataset.decompress()
        dataset.ImagePositionPatient = [
            f"{value:.4f}" for value in positions[0] + share * (positions[-1] - positions[0])
        ]
        dataset.InstanceNumber = number + 1
        dataset.SOPInstanceUID = pydicom.uid.generate_uid()
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        series_dir.mkdir(exist_ok=True)
        dataset.save_as(series_dir / f"{number + 1}.dcm")


def rescale_file(path, factor):
    """A slice resized by factor, its pixel spacing changed to keep its field of view."""
    import cv2
    import pydicom

    dataset = pydicom.dcmread(path)
    pixels = dataset.pixel_array
    size = (round(pixels.shape[1] * factor), round(pixels.shape[0] * factor))
    resized = cv2.resize(pixels, size, interpolation=cv2.INTER_LINEAR)
    spacing = [float(value) / factor for value in dataset.PixelSpacing]
    dataset.set_pixel_data(resized, "MONOCHROME2", bits_stored=12, generate_instance_uid=False)
    dataset.PixelSpacing = [f"{value:.5f}" for value in spacing]
    dataset.save_as(path)


def upsample_series(series_dir):
    for path in series_dir.glob("*.dcm"):
        rescale_file(path, 2.0)


# == one stage of one design, in its own process ==


def load_design(design, work):
    """script.py as it is (new), or as it was at OLD_COMMIT (old), imported as a module."""
    import importlib.util

    path = REPOSITORY / "script.py"
    if design == "old":
        path = Path(work) / "old_script.py"
        if not path.is_file():
            source = subprocess.run(
                ["git", "-C", str(REPOSITORY), "show", f"{OLD_COMMIT}:script.py"], capture_output=True, text=True
            )
            if source.returncode:
                sys.exit(f"error: the old design needs git and the commit {OLD_COMMIT}: {source.stderr.strip()}")
            path.write_text(source.stdout)
    spec = importlib.util.spec_from_file_location(f"{design}_script", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # So that its functions reach the worker processes by name.
    spec.loader.exec_module(module)
    return module


def run_stage(design, root, out, stage, workers):
    """One stage on one competition; prints its seconds and peak RSS (this process, and its largest worker)."""
    script = load_design(design, out)
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        run_stage_with(script, design, Path(root), Path(out), stage, workers)
    seconds = time.perf_counter() - started
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    workers_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_rss_mb": own, "worker_peak_rss_mb": workers_peak}))


def run_stage_with(script, design, root, out, stage, workers):
    series = {split: script.study_series(script.read_series_descriptions(root, split)) for split in ("train", "test")}

    def one_pass(split):  # The new design fills the split's slice cache as it crops, and crops from its stacks.
        if design == "old":
            return {}
        return {"cache": script.SliceCache(script.slice_cache(out, split), LOCALISER_SIZE, series[split])}

    if stage == "train":
        coordinates = script.read_coordinates(root / "train_label_coordinates.csv")
        script.prepare_competition(root, out / "prepared", "train", workers=workers, **one_pass("train"))
        studies = sorted(set(coordinates["study_id"]))
        cache_dir = script.slice_cache(out, "train")
        script.read_localiser_studies(root, "train", studies, LOCALISER_SIZE, coordinates, workers, cache_dir)
    elif stage == "test slices":
        cache_dir = script.slice_cache(out, "test")
        script.read_localiser_studies(root, "test", sorted(series["test"]), LOCALISER_SIZE, None, workers, cache_dir)
    else:
        points = root / "_truth" / "test_label_coordinates.csv"
        script.prepare_competition(root, out / "prepared", "test", points, workers=workers, **one_pass("test"))


def count_stage(design, root, out):
    """Every stage with one worker (a thread), counting each file's reads and decodes."""
    import pydicom

    script = load_design(design, out)
    reads, decodes = {}, {}
    dcmread = pydicom.dcmread

    def counted(path, *arguments, **keywords):
        reads[str(path)] = reads.get(str(path), 0) + 1
        if not keywords.get("stop_before_pixels"):
            dataset = dcmread(path, *arguments, **keywords)
            original = type(dataset).pixel_array

            class Counted(type(dataset)):
                @property
                def pixel_array(self):
                    decodes[str(path)] = decodes.get(str(path), 0) + 1
                    return original.fget(self)

            dataset.__class__ = Counted
            return dataset
        return dcmread(path, *arguments, **keywords)

    pydicom.dcmread = counted
    with contextlib.redirect_stdout(io.StringIO()):
        for stage in STAGES:
            run_stage_with(script, design, Path(root), Path(out), stage, workers=1)
    files = [str(path) for path in Path(root).rglob("*.dcm")]
    print(
        json.dumps(
            {
                "reads": histogram([reads.get(path, 0) for path in files]),
                "decodes": histogram([decodes.get(path, 0) for path in files]),
            }
        )
    )


def histogram(counts):
    values = {}
    for count in counts:
        values[str(count)] = values.get(str(count), 0) + 1
    return dict(sorted(values.items(), key=lambda item: int(item[0])))


# == the benchmark ==


def child(*arguments):
    done = subprocess.run([sys.executable, __file__, *arguments], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"error: {' '.join(arguments)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(work, studies, count):
    """Both designs on one competition: each stage REPEATS times, the designs taking turns, its best time kept."""
    root = work / f"competition_{studies}"
    if not (root / "_truth" / "real_sizes.done").is_file():
        shutil.rmtree(root, ignore_errors=True)
        print(f"writing a synthetic competition of {studies} + {max(1, studies // 4)} studies at {IMAGE_SIZE} px")
        write_competition(root, studies)
        (root / "_truth" / "real_sizes.done").write_text("")
    files = sum(1 for _ in root.rglob("*.dcm"))
    result = {"train_studies": studies, "test_studies": max(1, studies // 4), "dicom_files": files}
    figures = {"old": {}, "new": {}}
    for _ in range(REPEATS):
        for design in figures:
            out = Path(tempfile.mkdtemp(prefix=f"{design}_", dir=work))
            for stage in STAGES:
                run = child("--stage", design, str(root), str(out), stage)
                run["seconds_per_study"] = (
                    run["seconds"] / result["train_studies" if stage == "train" else "test_studies"]
                )
                best = figures[design].get(stage)
                figures[design][stage] = run if best is None or run["seconds"] < best["seconds"] else best
            shutil.rmtree(out)
    for design in figures:
        if count:
            counted = Path(tempfile.mkdtemp(prefix=f"{design}_count_", dir=work))
            figures[design]["counts"] = child("--count", "--stage", design, str(root), str(counted), "all")
            shutil.rmtree(counted)
        figures[design]["extrapolated_hours_on_kaggle"] = extrapolate(figures[design])
        result[design] = figures[design]
        print_design(studies, design, figures[design])
    return result


def extrapolate(figures):
    """Hours for the competition's studies on Kaggle's 4 cores, assuming decoding scales with the cores from the 2
    workers here (measured: 1.8-1.9x from 1 to 2)."""
    train = figures["train"]["seconds_per_study"] * TRAIN_STUDIES
    test = (figures["test slices"]["seconds_per_study"] + figures["test crops"]["seconds_per_study"]) * TEST_STUDIES
    return {"train": train * WORKERS / KAGGLE_CORES / 3600, "test": test * WORKERS / KAGGLE_CORES / 3600}


def print_design(studies, design, figures):
    stages = ", ".join(
        f"{stage} {figures[stage]['seconds_per_study']:.2f} s/study (peak {figures[stage]['peak_rss_mb']:.0f} MB, "
        f"worker {figures[stage]['worker_peak_rss_mb']:.0f} MB)"
        for stage in STAGES
    )
    hours = figures["extrapolated_hours_on_kaggle"]
    print(f"{studies} studies, {design}: {stages}; on Kaggle: {hours['train']:.2f} h train, {hours['test']:.2f} h test")
    if "counts" in figures:
        print(f"  reads per file {figures['counts']['reads']}, decodes per file {figures['counts']['decodes']}")


def main():
    arguments = parse_arguments()
    if arguments.stage and arguments.count:
        design, root, out, _ = arguments.stage
        return count_stage(design, root, out)
    if arguments.stage:
        return run_stage(*arguments.stage, WORKERS)
    work = arguments.work or Path(tempfile.mkdtemp(prefix="scale_"))
    work.mkdir(parents=True, exist_ok=True)
    results = [measure(work, studies, count=index == 0) for index, studies in enumerate(sorted(arguments.studies))]
    record = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "workers": WORKERS,
        "old_design": OLD_COMMIT,
        "results": results,
    }
    RESULTS.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
