"""script.py pasted verbatim into a notebook cell and run in a real Jupyter kernel (nbclient + ipykernel).

The notebook is executed once per module; each test inspects the cells and files it produced. Its cells:

    kernel              remembers the kernel's own command-line arguments (`-f kernel-….json`, ...)
    set_argv            sets sys.argv to a tiny training run, as the script's config section suggests
    script              script.py's text, read at test time; its `__main__` block trains with that sys.argv
    collector           the garbage collector's state after the script ran (nothing frozen in a kernel)
    call_main           calls main() with an explicit argument list: predict with the model just trained
    jupyter_arguments   parses the kernel's own arguments with the script's parser
    vs_code_arguments   parses the arguments VS Code starts its kernels with
"""

import json
import sys
from pathlib import Path

import nbclient
import nbformat
import numpy as np
import pandas as pd
import pytest
from conftest import QUICK_RUN, REPOSITORY

# The notebook client's limit for each cell; the tiny run takes well under a minute even on a busy machine.
CELL_TIMEOUT_SECONDS = 300
# How VS Code starts a Jupyter kernel: `--f=` where Jupyter passes `-f`, after options of its own.
VS_CODE_KERNEL_ARGUMENTS = [
    "--ip=127.0.0.1",
    "--stdin=9003",
    "--control=9001",
    "--hb=9000",
    '--Session.signature_scheme="hmac-sha256"',
    '--Session.key=b"0d5a3f1e-8c1b-4c4e-9d8e-2f6b7a1c3e5d"',
    "--shell=9002",
    '--transport="tcp"',
    "--iopub=9004",
    "--f=/tmp/kernel-v2-1234abcd.json",
]
SUBMISSION_COLUMNS = ["row_id", "normal_mild", "moderate", "severe"]


def notebook_cells(data_dir, train_output_dir, predict_output_dir):
    """The notebook's cells by name, in execution order."""
    train_arguments = ["--data-dir", str(data_dir), "--output-dir", str(train_output_dir), *QUICK_RUN]
    predict_arguments = [
        "predict",
        "--model",
        str(train_output_dir / "model.keras"),
        "--data-dir",
        str(data_dir),
        "--output-dir",
        str(predict_output_dir),
    ]
    # What the options must equal when every argument given is the kernel's own: the parser's defaults.
    defaults = 'vars(build_parser("train").parse_args([]))'
    return {
        "kernel": "import sys\nkernel_arguments = sys.argv[1:]\nprint(sys.executable)",
        "set_argv": f"sys.argv = {['script.py', *train_arguments]!r}",
        "script": (REPOSITORY / "script.py").read_text(encoding="utf-8"),
        "collector": "import gc\n(gc.isenabled(), gc.get_freeze_count())",
        "call_main": f"main({predict_arguments!r})",
        "jupyter_arguments": f"vars(parse_arguments(kernel_arguments)[1]) == {defaults}",
        "vs_code_arguments": f"vars(parse_arguments({VS_CODE_KERNEL_ARGUMENTS!r})[1]) == {defaults}",
    }


@pytest.fixture(scope="module")
def notebook(tiny_dataset, tmp_path_factory):
    """Executes the notebook once; returns its executed cells by name, the data folder and the output folders."""
    working_dir = tmp_path_factory.mktemp("notebook")
    output_dirs = {"script": working_dir / "train_run", "call_main": working_dir / "predict_run"}
    sources = notebook_cells(tiny_dataset, output_dirs["script"], output_dirs["call_main"])
    document = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in sources.values()])
    # allow_errors runs every cell, so that each test reports on its own cell rather than on the first failure.
    # "python3" is ipykernel's kernelspec, whose `python` jupyter_client replaces with this interpreter.
    client = nbclient.NotebookClient(
        document,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_SECONDS,
        allow_errors=True,
        resources={"metadata": {"path": str(working_dir)}},
    )
    client.execute()
    return {"cells": dict(zip(sources, document.cells)), "data_dir": tiny_dataset, "output_dirs": output_dirs}


def cell_text(notebook, name):
    """The cell's printed text and result; fails with the cell's error and stderr when it raised one."""
    outputs = notebook["cells"][name].outputs
    errors = [f"{output.ename}: {output.evalue}" for output in outputs if output.output_type == "error"]
    stderr = "".join(output.text for output in outputs if output.output_type == "stream" and output.name == "stderr")
    assert not errors, f"cell {name!r} raised {errors}; its stderr:\n{stderr}"
    return "".join(
        output.text if output.output_type == "stream" else output.data.get("text/plain", "")
        for output in outputs
        if output.output_type in ("stream", "execute_result")
    )


def assert_valid_submission(notebook, cell_name):
    """The cell's submission.csv: test.csv's row_ids in order, the three classes, finite probabilities summing to 1."""
    submission = pd.read_csv(notebook["output_dirs"][cell_name] / "submission.csv", dtype={"row_id": str})
    test_table = pd.read_csv(notebook["data_dir"] / "test.csv", dtype=str)
    assert list(submission.columns) == SUBMISSION_COLUMNS
    assert submission["row_id"].tolist() == test_table["row_id"].tolist()
    probabilities = submission[SUBMISSION_COLUMNS[1:]].to_numpy(dtype=np.float64)
    assert np.isfinite(probabilities).all() and (probabilities >= 0).all()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)


def test_kernel_runs_the_test_interpreter(notebook):
    """The kernel is the interpreter running the tests (the venv's), so the script sees the same packages."""
    kernel_executable = cell_text(notebook, "kernel").strip()
    assert Path(kernel_executable).resolve() == Path(sys.executable).resolve()


def test_script_cell_trains_with_sys_argv_set_in_an_earlier_cell(notebook):
    """The pasted script trains with the options of the earlier cell's sys.argv, not its defaults."""
    cell_text(notebook, "script")
    config = json.loads((notebook["output_dirs"]["script"] / "config.json").read_text())
    options = config["options"]
    chosen = (options["image_size"], options["epochs"], options["fine_tune_epochs"], options["weights"])
    assert chosen == (32, 1, 0, QUICK_RUN[QUICK_RUN.index("--weights") + 1])
    assert_valid_submission(notebook, "script")


def test_nothing_the_kernel_holds_is_frozen_from_the_garbage_collector(notebook):
    """Run as a script, collector_paused freezes what the imports made; in a kernel, which lives on and may free it,
    the collector is back on and nothing is frozen, though the script imported TensorFlow."""
    assert cell_text(notebook, "collector").strip() == "(True, 0)"


def test_main_called_from_a_cell_with_an_explicit_list(notebook):
    """main([...]) follows its own list rather than sys.argv, and hands its exit code back to the cell."""
    assert cell_text(notebook, "call_main").splitlines()[-1] == "0"
    assert_valid_submission(notebook, "call_main")


@pytest.mark.parametrize(
    "cell_name, ignored_argument",
    [("jupyter_arguments", "-f "), ("vs_code_arguments", "--f=/tmp/kernel-v2-1234abcd.json")],
)
def test_kernel_arguments_are_ignored(notebook, cell_name, ignored_argument):
    """Jupyter's `-f kernel.json` and VS Code's `--f=kernel.json` are announced as ignored and change no option."""
    text = cell_text(notebook, cell_name)
    assert "(ignoring arguments that are not this script's: " in text
    assert ignored_argument in text
    assert text.splitlines()[-1] == "True"
