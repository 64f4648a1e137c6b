"""The command line: commands and their options parse, bad options (and values that would only fail mid-run)
exit 2, --help documents every option, every command line the README shows parses, and in a notebook the
kernel's own arguments are ignored instead of refused."""

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import readme_commands, script

KERNEL_ARGUMENTS = ["-f", "/root/.local/share/jupyter/runtime/kernel-1234.json"]


@pytest.fixture(autouse=True)
def in_terminal(monkeypatch):
    """Run as from a terminal, whatever the test process has imported; the notebook test overrides this."""
    monkeypatch.setattr(script, "in_notebook", lambda: False)


def test_notebook_ignores_the_kernel_arguments_and_keeps_its_own(monkeypatch, capsys):
    """In a notebook, sys.argv holds the kernel's `-f connection.json`: it is ignored, --epochs 2 still counts."""
    monkeypatch.setattr(script, "in_notebook", lambda: True)
    command, options = script.parse_arguments([*KERNEL_ARGUMENTS, "--epochs", "2"])
    assert command == "train" and options.epochs == 2
    assert " ".join(KERNEL_ARGUMENTS) in capsys.readouterr().out


def test_a_script_run_freezes_what_its_imports_made_and_keeps_collecting():
    """Run as a script, the objects NumPy, pandas and TensorFlow make as they import are frozen out of the garbage
    collector's reach (collector_paused), and the collector is on again for the run's own."""
    program = (
        "import gc, runpy, sys\n"
        f"sys.argv = [{str(script.__file__)!r}, 'score', '--help']\n"
        "before = gc.get_freeze_count()\n"
        f"names = runpy.run_path({str(script.__file__)!r})\n"
        "names['import_tensorflow']()\n"
        "print(before, gc.get_freeze_count() > 100_000, gc.isenabled())\n"
    )
    completed = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300)
    assert completed.stdout.split() == ["0", "True", "True"], completed.stderr[-2000:]


def test_terminal_refuses_unknown_options(capsys):
    """From a terminal the same `-f` is a typo to point out: argparse exits 2 naming it."""
    with pytest.raises(SystemExit) as exit_info:
        script.parse_arguments([*KERNEL_ARGUMENTS, "--epochs", "2"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: -f" in capsys.readouterr().err


def test_bare_command_line_trains_with_the_defaults():
    """`python script.py` alone trains, with the defaults at the top of script.py."""
    command, options = script.parse_arguments([])
    assert command == "train"
    assert (options.data_dir, options.output_dir) == (script.DATA_DIR, script.OUTPUT_DIR)
    assert (options.image_size, options.batch_size) == (script.IMAGE_SIZE, script.BATCH_SIZE)
    assert (options.epochs, options.fine_tune_epochs) == (script.EPOCHS, script.FINE_TUNE_EPOCHS)
    assert (options.weights, options.class_weights) == (script.WEIGHTS, script.CLASS_WEIGHTS)


def test_every_scalar_setting_is_an_option_named_as_its_config_variable():
    """Each model setting that is a number has one name: --head-units sets HEAD_UNITS's setting, head_units."""
    _, options = script.parse_arguments([])
    settings = {**script.severity_settings(options).recorded(), **script.localiser_settings(options).recorded()}
    named = [
        name for name, value in settings.items() if isinstance(value, (int, float)) and name.upper() in vars(script)
    ]
    assert "localiser_min_slices_per_epoch" in named and "head_units" in named
    for name in named:
        assert getattr(options, name) == getattr(script, name.upper()), name
    changed = ["--head-units", "16", "--localiser-min-slices-per-epoch", "768", "--final-learning-rate", "0.5"]
    _, options = script.parse_arguments(changed)
    assert script.severity_settings(options).head_units == 16
    assert script.severity_settings(options).final_learning_rate == 0.5
    assert script.localiser_settings(options).localiser_min_slices_per_epoch == 768


def test_predict_command_parses_several_models():
    """`predict` takes one or more saved models, to average them, plus the options it shares with train."""
    command, options = script.parse_arguments(["predict", "--model", "a.keras", "b.keras", "--batch-size", "8"])
    assert command == "predict"
    assert options.model == [Path("a.keras"), Path("b.keras")]
    assert options.batch_size == 8


def test_score_command_parses():
    """`score` takes a solution and a submission file."""
    command, options = script.parse_arguments(["score", "--solution", "labels.csv", "--submission", "guess.csv"])
    assert command == "score"
    assert (options.solution, options.submission) == (Path("labels.csv"), Path("guess.csv"))


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--image-size", "16"], "--image-size"),
        (["--batch-size", "0"], "--batch-size"),
        (["--fine-tune-epochs", "-1"], "--fine-tune-epochs"),
        (["--val-fraction", "1"], "--val-fraction"),
        (["--class-weights", "1,2"], "--class-weights"),
        (["--epochs", "two"], "--epochs"),
        (["predict"], "--model"),
        (["score", "--solution", "labels.csv"], "--submission"),
    ],
)
def test_bad_option_values_exit_2_naming_the_option(argv, named, capsys):
    """Values the run cannot use are refused at parse time, before any data is read."""
    with pytest.raises(SystemExit) as exit_info:
        script.main(argv)
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--lr", "0"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--fine-tune-lr", "-1e-5"], "--fine-tune-lr"),
        (["--seed", "-1"], "--seed"),
        (["--class-weights", "1,2,inf"], "--class-weights"),
        (["--class-weights", "1,nan,4"], "--class-weights"),
        (["prepare", "--competition-dir", "c", "--out-dir", "o", "--crop-mm", "0"], "--crop-mm"),
    ],
)
def test_values_that_would_fail_mid_run_are_refused_at_parse_time(argv, named, capsys):
    """A negative seed crashed NumPy after the outputs were cleared, a zero crop divided by zero, and a learning
    rate or class weight of 0, nan or inf trained garbage: argparse now refuses each, naming the option."""
    with pytest.raises(SystemExit) as exit_info:
        script.main(argv)
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "predict", "score"])
def test_help_exits_0_and_documents_every_option(command, capsys):
    """`--help` succeeds and describes each option the command accepts."""
    argv = ["--help"] if command == "train" else [command, "--help"]
    with pytest.raises(SystemExit) as exit_info:
        script.main(argv)
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for action in script.build_parser(command)._actions:
        assert action.help, f"{action.option_strings} has no help text"
        for option in action.option_strings:
            assert option in help_text


def test_every_readme_command_line_parses():
    """Each complete command line the README shows (placeholders in [...] aside) is accepted by the parser, so
    the README cannot drift from the options."""
    commands = [command for command in readme_commands("python script.py") if "[" not in command]
    assert len(commands) >= 6
    for command in commands:
        words = shlex.split(command.split("  ")[0])  # A wide gap starts the table's explanation.
        script.parse_arguments(words[2:])
