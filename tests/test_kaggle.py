"""Kaggle detection: which data, output folder and ResNet50 weights a run picks up under a Kaggle root.

Every test points script.KAGGLE_ROOT at a fake root in a temporary folder and runs from an empty
temporary folder, so neither the machine's real /kaggle nor files in the repository can interfere.
Dataset folder names are random, since a user may attach a dataset under any name.
"""

import uuid
from pathlib import Path

import pandas as pd
import pytest
import synthetic
from conftest import QUICK_RUN, script

COMPETITION_SLUG = "rsna-2024-lumbar-spine-degenerative-classification"


@pytest.fixture
def kaggle_root(tmp_path, monkeypatch):
    """A fake Kaggle root with nothing attached yet, an empty current folder and an empty Keras cache."""
    root = tmp_path / "kaggle"
    root.mkdir()
    monkeypatch.setattr(script, "KAGGLE_ROOT", root)
    current_folder = tmp_path / "current_folder"
    current_folder.mkdir()
    monkeypatch.chdir(current_folder)
    # The real ~/.keras may hold the ImageNet weights, which would hide what the Kaggle search finds.
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    return root


def random_name(prefix=""):
    """A folder name the script cannot know in advance."""
    return f"{prefix}{uuid.uuid4().hex[:12]}"


def write_csv_header(path, columns):
    """A CSV holding only its header: all that detection reads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(",".join(columns) + "\n")


def attach_seed_dataset(kaggle_root, *folders):
    """A seed-layout train.csv (it has image_path) in a dataset under input/; returns its folder."""
    dataset_dir = kaggle_root.joinpath("input", *folders)
    write_csv_header(dataset_dir / "train.csv", script.TRAIN_COLUMNS)
    return dataset_dir


def attach_competition(kaggle_root):
    """The competition's own folder: a wide train.csv (no image_path) and its series descriptions."""
    competition_dir = kaggle_root / "input" / COMPETITION_SLUG
    write_csv_header(competition_dir / "train.csv", ["study_id", *script.WIDE_LABEL_COLUMNS])
    write_csv_header(competition_dir / "train_series_descriptions.csv", ["study_id", "series_id", "series_description"])
    return competition_dir


def test_without_kaggle_input_both_folders_default_to_the_current_one(kaggle_root):
    """A root without input/ is not Kaggle, even when working/ exists: data and outputs stay in "."."""
    (kaggle_root / "working").mkdir()
    assert not script.on_kaggle()
    assert script.resolve_data_dir(None, "train") == Path(".")
    assert script.resolve_output_dir(None) == Path(".")


@pytest.mark.parametrize("depth", [1, 3])
def test_attached_seed_dataset_is_found_and_named(kaggle_root, capsys, depth):
    """A seed-layout dataset up to three folders deep becomes the data folder, and the run says which it took;
    the outputs go to working/, the folder Kaggle keeps."""
    dataset_dir = attach_seed_dataset(kaggle_root, *(random_name() for _ in range(depth)))
    assert script.on_kaggle()
    assert script.resolve_data_dir(None, "train") == dataset_dir
    assert str(dataset_dir) in capsys.readouterr().out
    assert script.resolve_output_dir(None) == kaggle_root / "working"


def test_competition_folder_is_found_by_its_series_descriptions(kaggle_root):
    """The competition's wide train.csv has no image_path, so its folder is recognised by the series file."""
    competition_dir = attach_competition(kaggle_root)
    assert script.find_kaggle_data_dir("train")[0] == competition_dir
    assert script.is_competition_layout(competition_dir)


@pytest.mark.parametrize("split", ["train", "test"])
def test_the_attached_competition_wins_over_any_seed_layout_dataset(kaggle_root, split, capsys):
    """With the competition attached, its own listing decides, even when a seed-layout dataset sorts first and sits
    less deep, as a training run's prepared/ uploaded with its models does; the one line says what was passed over."""
    competition_dir = attach_competition(kaggle_root)
    write_csv_header(competition_dir / "test_series_descriptions.csv", ["study_id", "series_id", "series_description"])
    uploaded_run = attach_seed_dataset(kaggle_root, "aa-my-spine-model", "prepared")
    write_csv_header(uploaded_run / "test.csv", script.TEST_COLUMNS)
    assert script.resolve_data_dir(None, "predict" if split == "test" else "train") == competition_dir
    line = capsys.readouterr().out.strip()
    assert line.count("\n") == 0 and str(competition_dir) in line
    assert f"passed over the seed-layout data in {uploaded_run}" in line


def test_a_seed_layout_dataset_is_used_when_no_competition_is_attached(kaggle_root, capsys):
    """Without the competition, a seed-layout dataset is the data, and the line says why."""
    dataset_dir = attach_seed_dataset(kaggle_root, random_name("zz-"), random_name())
    assert script.resolve_data_dir(None, "train") == dataset_dir
    assert "no competition is attached" in capsys.readouterr().out


def test_train_csv_in_the_current_folder_wins_over_attached_data(kaggle_root):
    """A train.csv next to the script is the user's choice; only the output folder still follows Kaggle."""
    attach_seed_dataset(kaggle_root, random_name())
    write_csv_header(Path("train.csv"), script.TRAIN_COLUMNS)
    assert script.resolve_data_dir(None, "train") == Path(".")
    assert script.resolve_output_dir(None) == kaggle_root / "working"


def test_explicit_folders_win_over_detection(kaggle_root, tmp_path):
    """--data-dir and --output-dir are used as given, whatever is attached."""
    attach_seed_dataset(kaggle_root, random_name())
    data_dir, output_dir = tmp_path / random_name(), tmp_path / random_name()
    _, options = script.parse_arguments(["--data-dir", str(data_dir), "--output-dir", str(output_dir)])
    assert script.resolve_data_dir(options.data_dir, "train") == data_dir
    assert script.resolve_output_dir(options.output_dir) == output_dir


def test_imagenet_weights_in_an_attached_dataset_are_used(kaggle_root):
    """The notop weights file a few folders deep in any dataset is loaded from disk instead of downloaded."""
    # Four folders deep, as Kaggle mounts a model: input/{model}/{framework}/{variation}/{version}/.
    weights_dir = kaggle_root.joinpath("input", *(random_name() for _ in range(4)))
    weights_path = weights_dir / script.IMAGENET_WEIGHTS_FILE
    weights_dir.mkdir(parents=True)
    weights_path.write_bytes(b"")
    assert script.find_local_imagenet_weights() == weights_path
    weights, source = script.resolve_weights("imagenet")
    assert weights == str(weights_path)
    assert "local copy" in source and str(weights_path) in source


def test_without_a_local_copy_imagenet_weights_are_downloaded_up_front(kaggle_root, monkeypatch, tmp_path):
    """With no weights file attached or cached, the weights are fetched into the Keras cache before the run
    writes anything (the download itself is faked: tests use no network)."""
    attach_seed_dataset(kaggle_root, random_name())
    assert script.find_local_imagenet_weights() is None
    requests = []
    downloaded = tmp_path / script.IMAGENET_WEIGHTS_FILE
    monkeypatch.setattr(
        script.keras.utils, "get_file", lambda *arguments, **options: requests.append(arguments) or str(downloaded)
    )
    assert script.resolve_weights("imagenet") == (str(downloaded), f"ImageNet, downloaded to {downloaded}")
    assert requests == [(script.IMAGENET_WEIGHTS_FILE, script.IMAGENET_WEIGHTS_URL)]


def test_a_failed_download_is_refused_with_the_ways_out(kaggle_root, monkeypatch):
    """Offline, --weights imagenet without a local copy exits 2 before anything is written, saying what to pass."""

    def fail(*arguments, **options):
        raise Exception("URL fetch failure: no network")

    monkeypatch.setattr(script.keras.utils, "get_file", fail)
    with pytest.raises(script.InputError, match="--weights PATH.*--weights none"):
        script.resolve_weights("imagenet")


def test_training_on_kaggle_needs_no_folder_options(kaggle_root):
    """A bare training command finds the attached dataset and writes the submission to working/, not to "."."""
    dataset_dir = kaggle_root / "input" / random_name()
    synthetic.make_dataset(dataset_dir, train_studies=6, test_studies=1, image_size=32)
    assert script.main(QUICK_RUN) == 0
    submission = pd.read_csv(kaggle_root / "working" / "submission.csv", dtype={"row_id": str})
    test = pd.read_csv(dataset_dir / "test.csv", dtype={"row_id": str})
    assert submission["row_id"].tolist() == test["row_id"].tolist()
    assert not list(Path(".").iterdir())
