"""
Benchmarks: script.py's streaming pipeline against the naive in-RAM design (benchmarks/naive.py), on the same
generated data, in the same run.

    python benchmarks/bench.py                           # every section at 224 px (about 15 minutes on 2 cores)
    python benchmarks/bench.py --quick                   # smoke run: 64 px, few images, few steps
    python benchmarks/bench.py --only input,memory       # some sections only

Sections:
    input       read + resize + augment + preprocess, img/s: script.ImageBatches against
                ImageDataGenerator.flow over the naive in-RAM float64 array (whose one-time load is reported
                on its own); one worker (per core) and all cores.
    model       training on in-memory tensors, phase 1 (base frozen) and phase 2 (last layers unfrozen):
                the ceiling on this machine.
    end-to-end  model.fit on augmenting ImageBatches with all cores, as a share of the model-only figure.
    predict     model.predict on ImageBatches, as a share of model-only inference on in-memory tensors.
    memory      peak RSS of real 64-px training runs (one epoch) at N and 10·N images, and of the naive design,
                each in its own process.
    wallclock   whole runs (one epoch per phase, train + predict) of script.py and of naive.py on the same data.

Throughputs are steady state: warm-up steps (tracing, thread start-up) are left out of the timing. Prints one
table (progress goes to stderr) and writes the same figures, with the machine and library versions, as JSON.
Figures from a busy machine are noisy; quote the ones from a quiet run.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))
sys.path.insert(0, str(REPOSITORY / "tests"))

import cv2  # noqa: E402
import keras  # noqa: E402
import naive  # noqa: E402
import numpy as np  # noqa: E402
import scipy  # noqa: E402
import synthetic  # noqa: E402
import tensorflow as tf  # noqa: E402

import script  # noqa: E402  (needs the path set up above)

script.import_tensorflow()  # Keras, and script.py's Keras classes, which a plain import leaves out.

# ImageDataGenerator (in the naive design and in script.py's parameter sampling) is deprecated and says so often.
warnings.filterwarnings("ignore", category=DeprecationWarning)

SECTIONS = ("input", "model", "end-to-end", "predict", "memory", "wallclock")
INPUT_SPEEDUP_TARGET = 4.0  # Ours over the naive augmentation, images per second on one core.
END_TO_END_TARGET = 0.9  # Share of the model-only throughput, in both training phases and in prediction.
MEMORY_GROWTH_TARGET = 1.15  # Peak RSS at 10·N images over peak RSS at N images.
MEMORY_IMAGE_SIZE = 64  # The memory check reviewers run: 64 px, one epoch.
SOURCE_SCALE = 8 / 7  # Pictures on disk are larger than the model input (256 px for 224), so resizing is real work.
TEST_ROWS = 50  # test.csv rows of every generated dataset; the subprocess runs predict them.
INPUT_REPEATS = 3  # Input pipeline passes per configuration; the best one counts, as with timeit.
DESIGNS = {"ours": REPOSITORY / "script.py", "naive": REPOSITORY / "benchmarks" / "naive.py"}
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # The ones that decide TensorFlow's CPU kernels.


@dataclass
class Throughput:
    """Wall-clock images per second, and CPU milliseconds per image (all threads of this process).

    CPU time hardly moves when other processes compete for the cores, so it shows what a stage costs even on a
    busy machine; wall-clock rates show what a user waits for, and are only comparable on a quiet one.
    """

    images_per_second: float
    cpu_ms_per_image: float

    @classmethod
    def between(cls, start, end, image_count):
        """From two (perf_counter, process_time) marks around the processing of `image_count` images."""
        return cls(image_count / (end[0] - start[0]), 1000 * (end[1] - start[1]) / image_count)

    @classmethod
    def best(cls, throughputs):
        """The fastest of several measurements: load from other processes only ever slows one down."""
        return cls(max(t.images_per_second for t in throughputs), min(t.cpu_ms_per_image for t in throughputs))


def clock():
    return time.perf_counter(), time.process_time()


@dataclass
class Result:
    section: str
    measurement: str
    value: float
    unit: str
    target: str = ""
    passed: bool | None = None  # None: a figure for information, with no target.


class SteadyStateTimer(keras.callbacks.Callback):
    """Throughput over the batches after the first `warmup`, which pay for tracing and thread start-up."""

    def __init__(self, warmup, batch_size):
        super().__init__()
        self.warmup = warmup
        self.batch_size = batch_size
        self.batch_ends = []

    def on_train_batch_end(self, batch, logs=None):
        self.batch_ends.append(clock())

    def on_predict_batch_end(self, batch, logs=None):
        self.batch_ends.append(clock())

    def throughput(self):
        timed = self.batch_ends[self.warmup - 1 :]  # Starts at the end of the last warm-up batch.
        if len(timed) < 2:
            raise RuntimeError(f"only {len(self.batch_ends)} batches ran; need more than {self.warmup} warm-up ones")
        return Throughput.between(timed[0], timed[-1], (len(timed) - 1) * self.batch_size)


class Bench:
    """What the sections share: the options, the generated datasets, the model-only figures and the results."""

    def __init__(self, options, workspace):
        self.options = options
        self.workspace = workspace
        self.datasets = {}
        self.model_only = {}
        self.results = []

    def record(self, section, measurement, value, unit, target="", passed=None):
        result = Result(section, measurement, float(value), unit, target, passed)
        self.results.append(result)
        print(f"[{section}] {measurement}: {format_value(value, unit)} {verdict(result)}", file=sys.stderr, flush=True)

    def dataset(self, train_rows, image_size):
        """A generated dataset folder (train.csv, test.csv, images), made on first use."""
        key = (train_rows, image_size)
        if key not in self.datasets:
            folder = self.workspace / f"data-{train_rows}-rows-{image_size}-px"
            print(
                f"generating {train_rows} + {TEST_ROWS} pictures at {source_size(image_size)} px for {image_size}-px "
                f"runs in {folder}",
                file=sys.stderr,
                flush=True,
            )
            synthetic.make_dataset(
                folder,
                train_rows=train_rows,
                test_rows=TEST_ROWS,
                image_size=source_size(image_size),
                class_mix=synthetic.REAL_CLASS_MIX,
            )
            self.datasets[key] = folder
        return self.datasets[key]

    @property
    def timed_images(self):
        """Images that one throughput measurement uses: warm-up plus timed steps."""
        return (self.options.warmup_steps + self.options.steps) * self.options.batch_size

    def training_rows(self, count):
        """(image paths, labels) of the first `count` rows of the dataset the throughput sections share."""
        rows = max(self.options.images, self.timed_images)
        table = script.load_train_table(self.dataset(rows, self.options.image_size)).head(count)
        return table["image_path"].tolist(), table["label"].to_numpy()

    def model_only_throughput(self, phase):
        """Training on in-memory tensors in one phase; measured once, shared by model and end-to-end."""
        if phase not in self.model_only:
            paths, labels = self.training_rows(self.timed_images)
            self.model_only[phase] = self.best_of(
                training_throughput, paths, labels, phase, self.options, streamed=False
            )
        return self.model_only[phase]

    def best_of(self, measure, *arguments, **keywords):
        return Throughput.best([measure(*arguments, **keywords) for _ in range(self.options.repeats)])

    def record_throughput(self, section, measurement, throughput):
        self.record(section, measurement, throughput.images_per_second, "img/s")
        self.record(section, f"{measurement}, CPU time", throughput.cpu_ms_per_image, "ms/img")

    def record_share(self, section, measurement, throughput, ceiling):
        """The share of a ceiling reached: by wall clock (the target), and by CPU time (what load can't blur)."""
        share = throughput.images_per_second / ceiling.images_per_second
        self.record(section, measurement, share, "×", f"≥ {END_TO_END_TARGET:g}", share >= END_TO_END_TARGET)
        self.record(section, f"{measurement}, by CPU time", ceiling.cpu_ms_per_image / throughput.cpu_ms_per_image, "×")


# ============================================================================================ helpers


def source_size(image_size):
    return round(image_size * SOURCE_SCALE)


def training_model(options, phase):
    """script.py's model, compiled as script.py trains it in `phase` (1: base frozen, 2: last layers unfrozen)."""
    keras.backend.clear_session()
    keras.mixed_precision.set_global_policy(options.dtype_policy)  # After clear_session(), which resets it.
    model = script.build_model(options.image_size, None, from_scratch=False)
    if phase == 1:
        script.compile_model(model, script.LEARNING_RATE)
    else:
        script.unfreeze_model(model, script.FINE_TUNE_LAYERS)
        script.compile_model(model, script.FINE_TUNE_LEARNING_RATE)
    return model


def in_memory_batches(paths, labels, options, with_labels=True):
    """Two real augmented batches held as tensors and repeated forever: the model's input at no cost."""
    source = script.ImageBatches(
        paths[: 2 * options.batch_size],
        options.image_size,
        options.batch_size,
        labels=labels[: 2 * options.batch_size],
        augment=True,
    )
    images, one_hot, weights = (np.concatenate(parts) for parts in zip(source[0], source[1], strict=True))
    slices = (images, one_hot, weights) if with_labels else images
    return tf.data.Dataset.from_tensor_slices(slices).repeat().batch(options.batch_size).prefetch(tf.data.AUTOTUNE)


def streamed_batches(paths, labels, options, augment):
    """script.py's own streaming input, with one worker thread per core as in a real run."""
    return script.ImageBatches(
        paths,
        options.image_size,
        options.batch_size,
        labels=labels,
        class_weights=script.LABEL_WEIGHTS,
        augment=augment,
        workers=os.cpu_count(),
    )


def steps_of(data, options):
    """Infinite in-memory datasets need a step count; streamed ones end after their last batch."""
    return None if isinstance(data, keras.utils.PyDataset) else options.warmup_steps + options.steps


def training_throughput(paths, labels, phase, options, streamed):
    """A fresh model of `phase` trained on the images streamed from disk, or on in-memory tensors (the ceiling)."""
    model = training_model(options, phase)
    if streamed:
        data = streamed_batches(paths, labels, options, augment=True)
    else:
        data = in_memory_batches(paths, labels, options)
    timer = SteadyStateTimer(options.warmup_steps, options.batch_size)
    model.fit(data, epochs=1, steps_per_epoch=steps_of(data, options), callbacks=[timer], shuffle=False, verbose=0)
    return timer.throughput()


def predict_throughput(model, data, options):
    timer = SteadyStateTimer(options.warmup_steps, options.batch_size)
    model.predict(data, steps=steps_of(data, options), callbacks=[timer], verbose=0)
    return timer.throughput()


def pipeline_throughput(batches, workers, image_count):
    """Every batch of a PyDataset, best of INPUT_REPEATS passes.

    One worker calls __getitem__ in this thread; more share the batch indices in a thread pool, as PyDataset's
    enqueuer does. With one worker OpenCV is held to one thread too, so the figure is per core.
    """
    opencv_threads = cv2.getNumThreads()
    cv2.setNumThreads(1 if workers == 1 else opencv_threads)
    passes = []
    try:
        for _ in range(INPUT_REPEATS):
            start = clock()
            with ThreadPoolExecutor(workers) as pool:
                for _ in (pool.map if workers > 1 else map)(batches.__getitem__, range(len(batches))):
                    pass
            passes.append(Throughput.between(start, clock(), image_count))
    finally:
        cv2.setNumThreads(opencv_threads)
    return Throughput.best(passes)


# Runs in a small, fresh interpreter that starts the measured command. Linux charges a process that execs right
# after fork with the resident memory it was forked from, so a child forked from this large process would report
# at least this process's RSS as its own peak.
PEAK_RSS_RUNNER = """
import os, subprocess, sys, time
with open(sys.argv[1], "w") as log:
    started = time.perf_counter()
    process = subprocess.Popen(sys.argv[2:], stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(process.pid, 0)  # The resources of exactly this child.
print(os.waitstatus_to_exitcode(status), time.perf_counter() - started, usage.ru_utime + usage.ru_stime,
      usage.ru_maxrss)
"""


@dataclass
class Run:
    """What one finished process cost."""

    wall_seconds: float
    cpu_seconds: float
    peak_rss_mb: float

    @classmethod
    def best(cls, runs):
        """The quickest of several runs of one command, and the highest memory peak any of them reached."""
        return cls(
            min(run.wall_seconds for run in runs),
            min(run.cpu_seconds for run in runs),
            max(run.peak_rss_mb for run in runs),
        )


def run_measured(command, log_path):
    """Run one command to completion in its own process, and measure it."""
    print(f"running {' '.join(map(str, command))}", file=sys.stderr, flush=True)
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    runner = subprocess.run(
        [sys.executable, "-c", PEAK_RSS_RUNNER, str(log_path), *map(str, command)],
        env=environment,
        capture_output=True,
        text=True,
        check=True,
    )
    exit_code, wall_seconds, cpu_seconds, peak_kilobytes = runner.stdout.split()
    if int(exit_code) != 0:
        tail = "".join(Path(log_path).read_text().splitlines(keepends=True)[-20:])
        raise RuntimeError(f"{' '.join(map(str, command))} exited with {exit_code}; end of {log_path}:\n{tail}")
    return Run(float(wall_seconds), float(cpu_seconds), int(peak_kilobytes) / 1024)  # Linux reports kilobytes.


def training_command(program, data_dir, output_dir, image_size, fine_tune_epochs):
    """A real training run of script.py or naive.py: random weights, one epoch, optionally one more in phase 2."""
    return [
        sys.executable,
        str(program),
        "--data-dir",
        str(data_dir),
        "--output-dir",
        str(output_dir),
        "--weights",
        "none",
        "--image-size",
        str(image_size),
        "--epochs",
        "1",
        "--fine-tune-epochs",
        str(fine_tune_epochs),
    ]


# =========================================================================================== sections


def benchmark_input(bench):
    options = bench.options
    paths, labels = bench.training_rows(options.images)
    ours = script.ImageBatches(paths, options.image_size, options.batch_size, labels=labels, augment=True)
    started = time.perf_counter()
    images = naive.load_images(paths, options.image_size)
    load_seconds = time.perf_counter() - started
    flow = naive.augmenter().flow(images, np.eye(len(script.CLASS_NAMES))[labels], batch_size=options.batch_size)
    bench.record("input", f"naive one-time load of {len(paths)} images into RAM", load_seconds, "s")
    bench.record(
        "input",
        "naive in-RAM images (float64 array + flow's float32 copy)",
        (images.nbytes + flow.x.nbytes) / 2**20,
        "MB",
    )
    for workers in (1, os.cpu_count()):
        name = "1 worker" if workers == 1 else f"{workers} workers"
        ours_throughput = pipeline_throughput(ours, workers, len(paths))
        naive_throughput = pipeline_throughput(flow, workers, len(paths))
        bench.record_throughput("input", f"ours, {name}", ours_throughput)
        bench.record_throughput("input", f"naive ImageDataGenerator, {name}", naive_throughput)
        speedup = ours_throughput.images_per_second / naive_throughput.images_per_second
        if workers == 1:
            bench.record(
                "input",
                "ours / naive, per core",
                speedup,
                "×",
                f"≥ {INPUT_SPEEDUP_TARGET:g}",
                speedup >= INPUT_SPEEDUP_TARGET,
            )
            bench.record(
                "input",
                "ours / naive, per core, by CPU time",
                naive_throughput.cpu_ms_per_image / ours_throughput.cpu_ms_per_image,
                "×",
            )
        else:
            bench.record("input", f"ours / naive, {name}", speedup, "×")


def benchmark_model(bench):
    for phase in (1, 2):
        bench.record_throughput(
            "model", f"training on in-memory tensors, phase {phase}", bench.model_only_throughput(phase)
        )


def benchmark_end_to_end(bench):
    paths, labels = bench.training_rows(bench.timed_images)
    for phase in (1, 2):
        ceiling = bench.model_only_throughput(phase)
        throughput = bench.best_of(training_throughput, paths, labels, phase, bench.options, streamed=True)
        bench.record_throughput("end-to-end", f"training from disk, phase {phase}", throughput)
        bench.record_share("end-to-end", f"share of model-only, phase {phase}", throughput, ceiling)


def benchmark_predict(bench):
    options = bench.options
    paths, labels = bench.training_rows(bench.timed_images)
    model = training_model(options, 1)
    in_memory = in_memory_batches(paths, labels, options, with_labels=False)
    ceiling = bench.best_of(predict_throughput, model, in_memory, options)
    streamed = streamed_batches(paths, None, options, augment=False)
    throughput = bench.best_of(predict_throughput, model, streamed, options)
    bench.record_throughput("predict", "inference on in-memory tensors", ceiling)
    bench.record_throughput("predict", "prediction from disk", throughput)
    bench.record_share("predict", "share of model-only", throughput, ceiling)


def benchmark_memory(bench):
    counts = (bench.options.images, 10 * bench.options.images)
    for design, program in DESIGNS.items():
        peaks = []
        for count in counts:
            data_dir = bench.dataset(count, MEMORY_IMAGE_SIZE)
            command = training_command(
                program, data_dir, bench.workspace / f"memory-{design}-{count}", MEMORY_IMAGE_SIZE, fine_tune_epochs=0
            )
            peaks.append(run_measured(command, bench.workspace / f"memory-{design}-{count}.log").peak_rss_mb)
            bench.record("memory", f"{design}, peak RSS, {count} images at {MEMORY_IMAGE_SIZE} px", peaks[-1], "MB")
        growth = peaks[1] / peaks[0]
        measurement = f"{design}, peak RSS {counts[1]} / {counts[0]} images"
        if design == "ours":
            bench.record(
                "memory", measurement, growth, "×", f"≤ {MEMORY_GROWTH_TARGET:g}", growth <= MEMORY_GROWTH_TARGET
            )
        else:
            bench.record("memory", measurement, growth, "×")


def benchmark_wallclock(bench):
    options = bench.options
    data_dir = bench.dataset(options.images, options.image_size)
    runs = {design: [] for design in DESIGNS}
    for repeat in range(options.repeats):  # Alternating, so that a burst of load from elsewhere hits both designs.
        for design, program in DESIGNS.items():
            command = training_command(
                program,
                data_dir,
                bench.workspace / f"wallclock-{design}-{repeat}",
                options.image_size,
                fine_tune_epochs=1,
            )
            runs[design].append(run_measured(command, bench.workspace / f"wallclock-{design}-{repeat}.log"))
    best = {design: Run.best(design_runs) for design, design_runs in runs.items()}
    for design, run in best.items():
        bench.record(
            "wallclock",
            f"{design}, whole run, {options.images} images at {options.image_size} px",
            run.wall_seconds,
            "s",
        )
        bench.record("wallclock", f"{design}, CPU time of that run", run.cpu_seconds, "s")
        bench.record("wallclock", f"{design}, peak RSS of that run", run.peak_rss_mb, "MB")
    ratio = best["ours"].wall_seconds / best["naive"].wall_seconds
    bench.record("wallclock", "ours / naive, wall time", ratio, "×", "≤ 1", ratio <= 1)
    bench.record("wallclock", "ours / naive, CPU time", best["ours"].cpu_seconds / best["naive"].cpu_seconds, "×")


BENCHMARKS = {
    "input": benchmark_input,
    "model": benchmark_model,
    "end-to-end": benchmark_end_to_end,
    "predict": benchmark_predict,
    "memory": benchmark_memory,
    "wallclock": benchmark_wallclock,
}

# ============================================================================================= report


def machine():
    """The hardware, software and date the figures belong to."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    fields = dict(line.split(":", 1) for line in cpuinfo.splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    memory_kb = next((int(line.split()[1]) for line in meminfo.splitlines() if line.startswith("MemTotal:")), 0)
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": fields.get("model name", platform.processor()),
        "cores": os.cpu_count(),
        "cpu_flags": [flag for flag in CPU_FLAGS if flag in fields.get("flags", "").split()],
        "memory_gib": round(memory_kb / 2**20, 1),
        "platform": platform.platform(),
        "versions": {**script.library_versions(), "scipy": scipy.__version__},
    }


def format_value(value, unit):
    digits = {"img/s": 1, "ms/img": 2, "×": 2, "MB": 0, "s": 1}[unit]
    return f"{value:,.{digits}f} {unit}"


def verdict(result):
    return "" if result.passed is None else ("PASS" if result.passed else "MISS")


def print_report(header, options, results):
    print(
        f"{header['date']}  {header['cpu']}, {header['cores']} cores ({', '.join(header['cpu_flags'])}), "
        f"{header['memory_gib']} GiB, {header['platform']}"
    )
    print("  ".join(f"{name} {version}" for name, version in header["versions"].items()))
    print(
        f"image size {options.image_size} px, N = {options.images} images, batch {options.batch_size}, "
        f"{options.warmup_steps} warm-up + {options.steps} timed steps, dtype policy {options.dtype_policy}, "
        f"best of {options.repeats}\n"
    )
    width = max(len(result.measurement) for result in results)
    print(f"{'section':<11} {'measurement':<{width}} {'value':>15}  {'target':<7} verdict")
    for result in results:
        print(
            f"{result.section:<11} {result.measurement:<{width}} {format_value(result.value, result.unit):>15}  "
            f"{result.target:<7} {verdict(result)}"
        )


def parse_arguments(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].strip(), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--image-size", type=int, help="model input in pixels (default 224; 64 with --quick)")
    parser.add_argument(
        "--images", type=int, help="N: images for input, memory and wallclock (default 400; 128 with --quick)"
    )
    parser.add_argument("--steps", type=int, help="timed training or prediction steps (default 20; 4 with --quick)")
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed steps first (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=script.BATCH_SIZE, help="(default: %(default)s)")
    parser.add_argument(
        "--dtype-policy",
        default="float32",
        choices=("float32", "mixed_bfloat16"),
        help="Keras dtype policy of the model, predict and end-to-end sections; the subprocess "
        "runs use script.py's own --precision default (default: %(default)s)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="measure each training, prediction and wallclock figure this many times and keep "
        "the best (default: %(default)s; use 2 or 3 on a busy machine)",
    )
    parser.add_argument(
        "--workspace",
        type=Path,
        help="keep the generated data and the runs' logs here (default: a temporary folder, deleted)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: small images, few images and steps")
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections out of {', '.join(SECTIONS)} (default: all)",
    )
    parser.add_argument(
        "--json", type=Path, default=REPOSITORY / "benchmarks" / "results.json", help="(default: %(default)s)"
    )
    options = parser.parse_args(argv)
    options.image_size = options.image_size or (64 if options.quick else 224)
    options.images = options.images or (128 if options.quick else 400)
    options.steps = options.steps or (4 if options.quick else 20)
    options.only = [name.strip() for name in options.only.split(",") if name.strip()]
    unknown = [name for name in options.only if name not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    return options


def main(argv=None):
    options = parse_arguments(sys.argv[1:] if argv is None else argv)
    header = machine()
    with tempfile.TemporaryDirectory(prefix="bench-") as temporary:
        workspace = options.workspace or Path(temporary)
        workspace.mkdir(parents=True, exist_ok=True)
        bench = Bench(options, workspace)
        for name in options.only:
            BENCHMARKS[name](bench)
    print_report(header, options, bench.results)
    report = {
        **header,
        "options": {key: str(value) if isinstance(value, Path) else value for key, value in vars(options).items()},
        "results": [asdict(result) for result in bench.results],
    }
    options.json.parent.mkdir(parents=True, exist_ok=True)
    options.json.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(f"\nwrote {options.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
