"""Distribution strategies and precision: training on two replicas (two logical CPU devices in one process, or
two worker processes), the global batch, which process writes the artifacts, mixed precision with a float32
output, and the strategies that are refused."""

import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import keras
import numpy as np
import pandas as pd
import pytest
import synthetic
import tensorflow as tf
from conftest import QUICK_RUN, REPOSITORY, script

BATCH_SIZE = 8
# The smallest run that still trains, validates and predicts: phase 1 only, 32-px images, random weights.
SMALL_RUN = [*QUICK_RUN, "--batch-size", str(BATCH_SIZE)]  # The later --batch-size wins.
RUN_TIMEOUT_SECONDS = 300  # Far above a normal run: a run that takes longer is hung, waiting on a collective op.

# Logical devices must be configured before TensorFlow initialises, so this runs in a fresh interpreter as
# `python -c TWO_CPU_DEVICES_DRIVER REPOSITORY ARGUMENTS...`.
TWO_CPU_DEVICES_DRIVER = """
import sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
sys.path.insert(0, sys.argv[1])
import script
sys.exit(script.main(sys.argv[2:]))
"""

TWO_WORKERS = {"worker": ["host0:2222", "host1:2222"]}
CHIEF_AND_TWO_WORKERS = {"chief": ["host0:2222"], "worker": ["host1:2222", "host2:2222"]}
NO_GPU = pytest.mark.skipif(
    bool(tf.config.list_physical_devices("GPU")), reason="checks the choice on a CPU-only machine"
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Six training studies (150 rows) and one test study (25 rows), 32 px."""
    root = tmp_path_factory.mktemp("distribute_data")
    synthetic.make_dataset(root, train_studies=6, test_studies=1, image_size=32, seed=11)
    return root


# ------------------------------------------------------------------------------------- running processes


def start_process(command, log_path, environment=None):
    """Start a command with stdout and stderr going to files, so that a chatty process never blocks on a pipe."""
    with open(log_path.with_suffix(".out"), "w") as stdout, open(log_path.with_suffix(".err"), "w") as stderr:
        process = subprocess.Popen(
            command, cwd=REPOSITORY, stdout=stdout, stderr=stderr, env={**os.environ, **(environment or {})}
        )
    process.log_path = log_path
    return process


def run_together(processes):
    """Wait for processes that train together, and return what each did (exit code, stdout, stderr, finish time).

    When one fails, the others can only hang on their collective ops, so they are killed; so is every process
    still running after RUN_TIMEOUT_SECONDS (its exit code is then None)."""
    deadline = time.monotonic() + RUN_TIMEOUT_SECONDS
    finished_at = {}
    while len(finished_at) < len(processes):
        for process in processes:
            if process not in finished_at and process.poll() is not None:
                finished_at[process] = time.time()
        if any(process.returncode for process in finished_at) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for process in processes:
        if process not in finished_at:
            process.kill()
            process.wait()
    return [
        SimpleNamespace(
            exit_code=process.returncode if process in finished_at else None,
            finished_at=finished_at.get(process),
            stdout=process.log_path.with_suffix(".out").read_text(),
            stderr=process.log_path.with_suffix(".err").read_text(),
        )
        for process in processes
    ]


def require_success(run):
    """A training run that must have finished. On failure, show how it ended: the start of its last traceback,
    because the values quoted in an error message can fill pages, or else the end of stderr."""
    outcome = f"exit code {run.exit_code}" if run.exit_code is not None else f"killed after {RUN_TIMEOUT_SECONDS} s"
    _, found, traceback = run.stderr.rpartition("Traceback")
    error = (found + traceback)[:2500] if found else run.stderr[-2500:]
    assert run.exit_code == 0, f"{outcome}; stderr:\n{error}\nstdout ends:\n{run.stdout[-1500:]}"


def free_ports(count):
    """Local ports that nobody listens on: bound together, so that they differ, then released for the workers."""
    sockets = [socket.socket() for _ in range(count)]
    for each in sockets:
        each.bind(("127.0.0.1", 0))
    ports = [each.getsockname()[1] for each in sockets]
    for each in sockets:
        each.close()
    return ports


# ------------------------------------------------------------------------------------- what a run printed


def assert_global_batch(stdout, strategy_name, replicas):
    """The start-up line names the strategy and the global batch, and the epoch really took steps of that size."""
    global_batch = BATCH_SIZE * replicas
    assert f"strategy: {strategy_name}, {replicas} replica(s), global batch {global_batch};" in stdout, stdout
    training_rows = int(re.search(r"fold 1/1: (\d+) training rows", stdout).group(1))
    steps = math.ceil(training_rows / global_batch)
    # Keras logs each epoch as one line, "STEPS/STEPS - ...", when stdout is not a terminal.
    assert re.search(rf"^{steps}/{steps} - ", stdout, re.MULTILINE), (
        f"expected {steps} steps of {global_batch} images in the epoch:\n{stdout}"
    )


def written_paths(stdout):
    """The files that a run's end summary lists under 'Wrote:'."""
    summary = stdout.split("Wrote:\n", 1)[1].split("Predict again", 1)[0]
    return {Path(line.split()[-1]) for line in summary.splitlines() if line.strip()}


def assert_valid_submission(data_dir, path):
    """submission.csv: the submission columns, test.csv's rows in order, finite probabilities summing to 1."""
    submission = pd.read_csv(path, dtype={"row_id": str})
    test = pd.read_csv(data_dir / "test.csv", dtype={"row_id": str})
    assert list(submission.columns) == ["row_id", *script.CLASS_NAMES]
    assert submission["row_id"].tolist() == test["row_id"].tolist()
    probabilities = submission[list(script.CLASS_NAMES)].to_numpy()
    assert np.isfinite(probabilities).all()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)


# ----------------------------------------------------------------------------- one process, two devices


def test_mirrored_strategy_on_two_logical_cpus_doubles_the_global_batch(data_dir, tmp_path):
    """--strategy mirrored spreads every step over both CPU devices, each taking --batch-size images, and the
    run still ends with a valid submission."""
    output_dir = tmp_path / "output"
    command = [
        sys.executable,
        "-c",
        TWO_CPU_DEVICES_DRIVER,
        str(REPOSITORY),
        *SMALL_RUN,
        "--strategy",
        "mirrored",
        "--data-dir",
        str(data_dir),
        "--output-dir",
        str(output_dir),
    ]
    [run] = run_together([start_process(command, tmp_path / "mirrored")])
    require_success(run)
    assert_global_batch(run.stdout, "MirroredStrategy", replicas=2)
    assert_valid_submission(data_dir, output_dir / "submission.csv")


# ------------------------------------------------------------------------------------ two worker processes


@pytest.fixture(scope="module")
def two_workers(data_dir, tmp_path_factory):
    """Two worker processes on this machine, named in TF_CONFIG, train one model with --strategy auto. Both get
    the same command line, --output-dir included, as every machine of a cluster would. Temporary folders go to
    their own root, so that the scratch folder of worker 1 can be found. Returns the chief's and worker 1's runs."""
    root = tmp_path_factory.mktemp("two_workers")
    scratch_root = root / "scratch"
    scratch_root.mkdir()
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    command = [
        sys.executable,
        "script.py",
        *SMALL_RUN,
        "--strategy",
        "auto",
        "--data-dir",
        str(data_dir),
        "--output-dir",
        str(root / "output"),
    ]
    processes = [
        start_process(
            command,
            root / f"worker{index}",
            {
                "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
                "TMPDIR": str(scratch_root),
            },
        )
        for index in range(2)
    ]
    chief, worker = run_together(processes)
    require_success(chief)
    require_success(worker)
    return SimpleNamespace(chief=chief, worker=worker, output_dir=root / "output", scratch_root=scratch_root)


def test_two_workers_train_together_under_multi_worker_mirrored_strategy(two_workers):
    """With TF_CONFIG naming two workers, --strategy auto picks MultiWorkerMirroredStrategy, one replica per
    worker, and every step takes --batch-size images on each worker."""
    for run in (two_workers.chief, two_workers.worker):
        assert_global_batch(run.stdout, "MultiWorkerMirroredStrategy", replicas=2)


def test_only_the_chief_writes_to_the_output_folder(two_workers):
    """Worker 1, although given the same --output-dir, writes to a scratch folder, so it cannot clobber the
    chief's artifacts: the output folder holds exactly the files the chief reported, none changed after the
    chief exited."""
    chief, worker = two_workers.chief, two_workers.worker
    assert "scratch folder" not in chief.stdout
    scratch_folder = Path(re.search(r"writing to scratch folder (\S+)", worker.stdout).group(1))
    assert scratch_folder.is_relative_to(two_workers.scratch_root)
    assert all(path.is_relative_to(scratch_folder) for path in written_paths(worker.stdout))
    files = {path for path in two_workers.output_dir.rglob("*") if path.is_file()}
    assert files == written_paths(chief.stdout)
    assert all(path.stat().st_mtime <= chief.finished_at for path in files)


def test_a_worker_deletes_its_scratch_folder(two_workers):
    """Worker 1's copies of the artifacts (a model file per fold among them) are not left behind in the
    temporary folder."""
    assert not list(two_workers.scratch_root.iterdir())


def test_the_chief_writes_a_valid_submission(data_dir, two_workers):
    assert_valid_submission(data_dir, two_workers.output_dir / "submission.csv")


# ------------------------------------------------------------------------------------------- precision


@pytest.fixture
def restore_float32_policy():
    """choose_precision sets Keras' global dtype policy: put the default back for the tests that follow."""
    yield
    keras.mixed_precision.set_global_policy("float32")


@NO_GPU
@pytest.mark.parametrize(
    "precision, policy", [("auto", "float32"), ("float32", "float32"), ("mixed", "mixed_bfloat16")]
)
def test_precision_choice_without_a_gpu(precision, policy, restore_float32_policy):
    """Without a GPU, auto keeps float32 (mixed precision does not pay on the CPU) and mixed means bfloat16."""
    keras.mixed_precision.set_global_policy("mixed_float16")  # So that every choice has to change the policy.
    assert script.choose_precision(precision) == policy
    assert keras.mixed_precision.global_policy().name == policy


@pytest.mark.parametrize(
    "capability, policy", [((6, 0), "float32"), ((7, 5), "mixed_float16"), ((8, 0), "mixed_float16")]
)
def test_auto_precision_uses_float16_only_on_gpus_with_tensor_cores(
    capability, policy, monkeypatch, restore_float32_policy
):
    """A P100 (compute capability 6.0) has no tensor cores, where float16 runs slower: auto stays float32 there and
    says why; a T4 (7.5) or newer gets mixed_float16."""
    gpu = object()
    monkeypatch.setattr(script.tf.config, "list_physical_devices", lambda kind=None: [gpu] if kind == "GPU" else [])
    monkeypatch.setattr(
        script.tf.config.experimental, "get_device_details", lambda device: {"compute_capability": capability}
    )
    assert script.choose_precision("auto") == policy
    reason = script.precision_policy("auto")[1]
    assert str(capability) in reason and ("no tensor cores" in reason) == (policy == "float32")


def test_mixed_bfloat16_trains_a_step_and_keeps_the_output_float32(restore_float32_policy):
    """Under --precision mixed on the CPU, the network computes in bfloat16 and a training step gives a finite
    loss, while the softmax layer computes, and returns, float32 probabilities."""
    script.choose_precision("mixed")
    model = script.build_model(32, None, from_scratch=False)
    script.compile_model(model, script.LEARNING_RATE)
    images = np.random.default_rng(0).uniform(-120, 150, (4, 32, 32, 3)).astype(np.float32)
    labels = np.eye(len(script.CLASS_NAMES), dtype=np.float32)[[0, 1, 2, 0]]
    assert math.isfinite(model.train_on_batch(images, labels, return_dict=True)["loss"])
    assert model.get_layer("resnet50").get_layer("conv1_conv").dtype_policy.compute_dtype == "bfloat16"
    assert model.get_layer("severity").dtype_policy.compute_dtype == "float32"
    probabilities = model.predict(images, verbose=0)
    assert probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


# ------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "strategy, tf_config, fragments",
    [
        ("tpu", None, ["--strategy tpu", "TPU", "Python"]),
        ("multiworker", None, ["--strategy multiworker", "TF_CONFIG"]),
        ("auto", "not JSON", ["TF_CONFIG"]),
    ],
    ids=["tpu", "multiworker-without-TF_CONFIG", "malformed-TF_CONFIG"],
)
def test_strategies_that_cannot_run_are_refused(
    data_dir, tmp_path, monkeypatch, capsys, strategy, tf_config, fragments
):
    """A strategy that cannot run is refused before training: exit code 2, a message saying why, nothing written."""
    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", tf_config)
    output_dir = tmp_path / "output"
    exit_code = script.main(
        [*SMALL_RUN, "--strategy", strategy, "--data-dir", str(data_dir), "--output-dir", str(output_dir)]
    )
    message = capsys.readouterr().err
    assert exit_code == 2
    for fragment in fragments:
        assert fragment in message, message
    assert not output_dir.exists()


# ------------------------------------------------------------------------------ the chief and the replicas


def strategy_in(cluster, task_type=None, task_id=None):
    """A stand-in for a strategy: a real cluster resolver for `cluster`, or none for a single-process strategy
    (cluster None)."""
    resolver = (
        None
        if cluster is None
        else tf.distribute.cluster_resolver.SimpleClusterResolver(
            tf.train.ClusterSpec(cluster), task_type=task_type, task_id=task_id
        )
    )
    return SimpleNamespace(cluster_resolver=resolver)


@pytest.mark.parametrize(
    "strategy, chief",
    [
        (strategy_in(None), True),
        (strategy_in({}), True),
        (strategy_in(TWO_WORKERS, "worker", 0), True),
        (strategy_in(TWO_WORKERS, "worker", 1), False),
        (strategy_in(CHIEF_AND_TWO_WORKERS, "chief", 0), True),
        (strategy_in(CHIEF_AND_TWO_WORKERS, "worker", 0), False),
        (strategy_in(CHIEF_AND_TWO_WORKERS, "worker", 1), False),
    ],
    ids=[
        "one-process",
        "no-cluster",
        "worker0",
        "worker1",
        "chief-job",
        "worker0-beside-a-chief",
        "worker1-beside-a-chief",
    ],
)
def test_is_chief(strategy, chief):
    """Exactly one process of a cluster writes: the task called chief, else worker 0; a lone process always does."""
    assert script.is_chief(strategy) is chief


@pytest.mark.parametrize(
    "strategy, workers",
    [
        (strategy_in(None), 1),
        (strategy_in({}), 1),
        (strategy_in(TWO_WORKERS, "worker", 1), 2),
        (strategy_in(CHIEF_AND_TWO_WORKERS, "chief", 0), 3),
    ],
    ids=["one-process", "no-cluster", "two-workers", "chief-and-two-workers"],
)
def test_worker_count(strategy, workers):
    """The processes that train together: the chief and the workers of a cluster, else just this one."""
    assert script.worker_count(strategy) == workers
