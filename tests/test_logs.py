"""What the script prints: no TensorFlow start-up lines before its own (a broken installation's traceback still
shows), a refusal is one line on stderr, prepare's progress in a log is a few plain lines, and of TensorFlow's
retracing notes only the false alarm about Keras' fresh functions is dropped."""

import logging
import os
import subprocess
import sys

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


def test_a_real_import_error_still_shows(tmp_path):
    """Silencing the start-up lines must not swallow a broken installation: its traceback reaches stderr."""
    (tmp_path / "keras.py").write_text('raise ImportError("this keras is broken on purpose")\n')
    completed = run_script("--help", env={"PYTHONPATH": str(tmp_path)})
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
