"""What the script prints: no TensorFlow start-up lines before its own (a broken installation's traceback still
shows), a refusal is one line on stderr, prepare's progress in a log is a few plain lines, and of TensorFlow's
retracing notes only the false alarm about Keras' fresh functions is dropped. And what it imports: the commands that
run no model (prepare, score, --help) start without TensorFlow, Keras or scikit-learn."""

import logging
import os
import subprocess
import sys

import pandas as pd
from conftest import REPOSITORY, SUBMISSION_HEADER, script

TENSORFLOW_START_UP = ("oneDNN", "cudart_stub", "absl::InitializeLog", "cuInit", "cpu_feature_guard")


def run_script(*arguments, env=None, timeout=120):
    """script.py in a fresh process, as a user starts it, without the tests' TF_CPP_MIN_LOG_LEVEL."""
    environment = {name: value for name, value in os.environ.items() if name != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.run(
        [sys.executable, str(REPOSITORY / "script.py"), *arguments],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**environment, **(env or {})},
    )


# ================================================================================================ start-up lines


def test_help_prints_no_tensorflow_start_up_lines():
    """`python script.py --help` in a fresh process prints the usage and nothing on stderr: TensorFlow's native
    start-up lines (twice, from its two libraries) used to come first."""
    completed = run_script("--help")
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.startswith("usage: script.py")
    assert not any(line in completed.stderr for line in TENSORFLOW_START_UP), completed.stderr
    assert completed.stderr == ""


def test_a_command_that_imports_tensorflow_prints_only_its_own_lines(tmp_path):
    """localise imports TensorFlow before it reads its localiser: refused for a missing file, its one line is all that
    stderr holds, without the start-up lines."""
    missing = tmp_path / "localiser.keras"
    completed = run_script("localise", "--localiser", str(missing), "--competition-dir", ".", "--out", "points.csv")
    assert completed.returncode == 2
    assert not any(line in completed.stderr for line in TENSORFLOW_START_UP), completed.stderr
    assert (
        completed.stderr
        == f"error: --localiser {missing}: file not found. Check the folder given on the command line.\n"
    )


def test_a_real_import_error_still_shows(tmp_path):
    """Silencing the start-up lines must not swallow a broken installation: its traceback reaches stderr."""
    (tmp_path / "keras.py").write_text('raise ImportError("this keras is broken on purpose")\n')
    arguments = ["localise", "--localiser", "localiser.keras", "--competition-dir", ".", "--out", "points.csv"]
    completed = run_script(*arguments, env={"PYTHONPATH": str(tmp_path)})
    assert completed.returncode == 1
    assert "Traceback" in completed.stderr and "this keras is broken on purpose" in completed.stderr


def test_score_with_a_header_only_submission_exits_2_with_one_line(tmp_path):
    """Run as a user runs it: a header-only submission used to end in a TypeError traceback (exit 1). Now one line
    names the file, exit 2, and no TensorFlow line is printed around it."""
    solution = tmp_path / "solution.csv"
    solution.write_text(SUBMISSION_HEADER + "1_spinal_canal_stenosis_l1_l2,1,0,0\n")
    submission = tmp_path / "submission.csv"
    submission.write_text(SUBMISSION_HEADER)
    completed = run_script("score", "--solution", str(solution), "--submission", str(submission))
    assert completed.returncode == 2
    assert completed.stderr.startswith(f"error: {submission}: has a header but no rows")
    assert completed.stderr.count("\n") == 1, completed.stderr
    assert completed.stdout == ""


# ============================================================================================== what is imported

MODEL_LIBRARIES = {"tensorflow", "keras", "sklearn"}
# script.py run as `python script.py` does, then the top-level packages in sys.modules on the last line of stdout.
# (Not `python -X importtime`: its lines go to file descriptor 2, which is silenced while TensorFlow imports.)
IMPORTS_PROBE = """
import atexit, runpy, sys
atexit.register(lambda: print("imported:", *sorted({name.split(".")[0] for name in sys.modules}), flush=True))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def imported_by(*arguments):
    """(the completed process, the top-level packages it imported) for script.py run with these arguments."""
    completed = subprocess.run(
        [sys.executable, "-c", IMPORTS_PROBE, str(REPOSITORY / "script.py"), *arguments],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=120,
    )
    last = (completed.stdout.splitlines() or [""])[-1]
    assert last.startswith("imported: "), (completed.stdout[-2000:], completed.stderr[-2000:])
    return completed, set(last.split()[1:])


def test_commands_without_a_model_never_import_tensorflow_keras_or_sklearn(damaged_competition, tmp_path):
    """prepare, score and --help need no model, so they skip the seconds that importing TensorFlow, Keras and
    scikit-learn takes (import_tensorflow): that start-up cost was most of a small prepare's time, and kept
    --workers 2 from nearly halving it. The commands that do need them import them (the next test)."""
    competition = damaged_competition[0]
    solution, submission = tmp_path / "solution.csv", tmp_path / "submission.csv"
    solution.write_text(SUBMISSION_HEADER + "1_spinal_canal_stenosis_l1_l2,1,0,0\n")
    submission.write_text(SUBMISSION_HEADER + "1_spinal_canal_stenosis_l1_l2,0.7,0.2,0.1\n")
    prepare = ["prepare", "--competition-dir", str(competition.root), "--out-dir", str(tmp_path / "prepared")]
    for arguments in (
        [*prepare, "--workers", "2"],
        ["score", "--solution", str(solution), "--submission", str(submission)],
        ["prepare", "--help"],
        ["score", "--help"],
        ["--help"],
    ):
        completed, imported = imported_by(*arguments)
        assert completed.returncode == 0, (arguments, completed.stderr[-2000:])
        assert not imported & MODEL_LIBRARIES, (arguments, imported & MODEL_LIBRARIES)
    assert len(pd.read_csv(tmp_path / "prepared" / "train.csv")) > 0


def test_a_command_with_a_model_imports_tensorflow_keras_and_sklearn(tmp_path):
    """localise imports all three (import_tensorflow) before it reads its localiser, even one that is missing; and
    the check above sees imports at all."""
    missing = tmp_path / "localiser.keras"
    completed, imported = imported_by(
        "localise", "--localiser", str(missing), "--competition-dir", ".", "--out", "p.csv"
    )
    assert completed.returncode == 2, completed.stderr
    assert MODEL_LIBRARIES <= imported


# ================================================================================================ progress lines


def test_prepare_prints_plain_progress_lines_into_a_log(damaged_competition):
    """Redirected, prepare's progress is a few plain lines, without the progress bar's carriage returns or colours."""
    _, summary, _, prepare_output, _, _ = damaged_competition
    assert "\r" not in prepare_output and "\x1b" not in prepare_output
    lines = prepare_output.splitlines()
    assert lines and all(line.startswith("crops: ") for line in lines) and len(lines) <= 10
    assert lines[-1].endswith("(100%)")


# ============================================================================================ TensorFlow's logger


def test_only_the_false_retracing_alarm_about_fresh_keras_functions_is_dropped():
    """TensorFlow's retracing note about Keras' per-compile multi_step_on_iterator functions (each traced once)
    is dropped from its logger; the same note about any other function still shows."""

    def note(function_name):
        message = f"5 out of the last 9 calls to <function {function_name} at 0x1> triggered tf.function retracing."
        return logging.LogRecord("tensorflow", logging.WARNING, __file__, 1, message, None, None)

    logger = script.tf.get_logger()
    assert sum(getattr(known, "__name__", "") == "keep_tensorflow_record" for known in logger.filters) == 1
    assert not logger.filter(note("TensorFlowTrainer._make_function.<locals>.multi_step_on_iterator"))
    assert logger.filter(note("recalibrate_batch_normalization.<locals>.statistics_pass"))
