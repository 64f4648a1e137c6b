"""The level localiser on a synthetic competition with anatomy and true 3-D geometry (tests/anatomy_synthetic.py):
training with a competition folder trains it and reports its error on held-out studies; it learns within a short
run; `localise` writes train_label_coordinates.csv's format; and localise → prepare → predict gives all 25 rows of
every test study, at the points it found."""

import json
import os
import subprocess
import sys
import types
from dataclasses import replace

import anatomy_synthetic as A
import numpy as np
import pandas as pd
import pytest
from conftest import RANDOM_WEIGHTS, script
from hypothesis import given, settings
from hypothesis import strategies as st

# Ten training studies (two held out for validation) and two test studies, at 96 px so that a run is quick.
TRAIN_STUDIES, TEST_STUDIES, DICOM_SIZE = 10, 2, 96
# The severity model only has to grade the found points here, not to learn: random weights from a file (the base
# frozen) train it in a fraction of a from-scratch epoch.
LOCALISER_RUN = [
    "--weights",
    str(RANDOM_WEIGHTS),
    *"--image-size 32 --epochs 1 --fine-tune-epochs 0 --localiser-epochs 12 --localiser-image-size 64 --seed 0".split(),
]
# A short run must bring the median error well below that of a guess that knows no anatomy: each point at the
# middle of its labelled slice, which misses by several centimetres.
MAXIMUM_MEDIAN_MM = 20.0


@pytest.fixture(scope="module")
def competition(tmp_path_factory):
    return A.write_anatomical_competition(
        tmp_path_factory.mktemp("localiser"), TRAIN_STUDIES, TEST_STUDIES, seed=7, image_size=DICOM_SIZE
    )


# Every DICOM file the training run below reads whole or in part ({path: times}), and decodes: one worker (a thread),
# so that the counts see every read.
READS, DECODES = {}, {}


@pytest.fixture(scope="module")
def trained(competition, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("localiser_run")
    argv = [*LOCALISER_RUN, "--data-dir", str(competition.root), "--output-dir", str(output_dir), "--workers", "1"]
    pydicom, slice_pixels = script.load_pydicom(), script.slice_pixels

    def counted_read(path, *arguments, **keywords):
        READS[str(path)] = READS.get(str(path), 0) + 1
        return dcmread(path, *arguments, **keywords)

    def counted_decode(dataset, path, *arguments):
        DECODES[str(path)] = DECODES.get(str(path), 0) + 1
        return slice_pixels(dataset, path, *arguments)

    with pytest.MonkeyPatch.context() as monkeypatch:
        dcmread = pydicom.dcmread
        monkeypatch.setattr(pydicom, "dcmread", counted_read)
        monkeypatch.setattr(script, "slice_pixels", counted_decode)
        assert script.main(argv) == 0
    return output_dir


def test_a_training_run_reads_each_dicom_at_most_twice_and_decodes_it_once_a_read(competition, trained):
    """One pass over each training study makes both the localiser's slices and the labelled crops; the validation
    and test studies are read once more, for the slices of the crops at their found points, and nothing else is."""
    files = {str(path) for path in competition.root.rglob("*.dcm")}
    assert set(READS) == files  # Every study is read: the training, validation and test ones.
    assert max(READS.values()) == 2 and all(DECODES.get(path, 0) <= READS[path] for path in files)
    found_in = set(pd.read_csv(trained / "prepared" / "validation_coordinates.csv", dtype=str)["study_id"])
    trained_on = {path for path in files if "/train_images/" in path and path.split("/")[-3] not in found_in}
    assert trained_on and all(READS[path] == 1 for path in trained_on)


def test_the_one_pass_cuts_the_crops_that_the_prepare_command_cuts(competition, trained, tmp_path):
    assert script.main(["prepare", "--competition-dir", str(competition.root), "--out-dir", str(tmp_path)]) == 0
    prepared = sorted((tmp_path / "images" / "train").glob("*.png"))
    assert len(prepared) > 100
    for path in prepared:
        assert path.read_bytes() == (trained / "prepared" / "images" / "train" / path.name).read_bytes(), path.name


def world_errors(competition, points):
    """The distance (mm) of each found point to the phantom's true point, by condition group."""
    truth = competition.points.set_index("row_id")
    errors = []
    for row in points.itertuples():
        condition, level = script.snake_case(pd.Series([row.condition, row.level]))
        row_id = f"{row.study_id}_{condition}_{level}"
        series_dir = competition.root / "test_images" / str(row.study_id) / str(row.series_id)
        stacks = script.read_stacks(series_dir)
        stack, index = next(
            (stack, stack.instance_numbers.index(row.instance_number))
            for stack in stacks
            if row.instance_number in stack.instance_numbers
        )
        found = stack.pixel_to_world(index, row.x, row.y)
        true = truth.loc[row_id, ["world_x", "world_y", "world_z"]].to_numpy(float)
        errors.append((script.condition_groups(pd.Series([row_id]))[0], float(np.linalg.norm(found - true))))
    return pd.DataFrame(errors, columns=["group", "mm"])


def test_training_on_a_competition_trains_and_measures_the_localiser(trained):
    assert (trained / "localiser.keras").is_file()
    localisation = json.loads((trained / "metrics.json").read_text())["localisation"]
    assert set(localisation) == {"spinal", "foraminal", "subarticular", "severity"}
    for name in ("spinal", "foraminal", "subarticular"):
        group = localisation[name]
        assert group["points"] > 0 and 0 <= group["within_10mm"] <= 1 and group["median_mm"] >= 0
        assert 0 <= group["slice_within_one"] <= 1 and 0 <= group["level_swaps"] <= 1
        # Real bounds: below a guess that knows no anatomy, on the two held-out studies (5-10 points a group, so
        # looser than the test studies' MAXIMUM_MEDIAN_MM), and every chain counted before and after decoding.
        assert group["median_mm"] <= 1.5 * MAXIMUM_MEDIAN_MM and group["p90_mm"] >= group["median_mm"], (name, group)
    for name in ("spinal", "foraminal"):
        group = localisation[name]
        assert 0 <= group["studies_with_a_broken_chain_after"] <= group["studies_with_a_broken_chain_before"] <= 2
    # The severity model scored twice on the validation rows: at the labelled and at the found points.
    severity = localisation["severity"]
    assert severity["rows"] > 0 and severity["score_at_found_points"] > 0 and severity["score_at_labelled_points"] > 0
    assert (trained / "localisation.png").is_file()
    assert json.loads((trained / "config.json").read_text())["localiser_model"]["localiser_epochs"] == 12
    # The chains' step range learned from the labels: these phantoms' chains are as even as healthy spines'.
    ranges = json.loads((trained / "localiser.json").read_text())["chain_step_ranges"]
    assert ranges == dict.fromkeys(script.CHAIN_CONDITIONS, list(script.CHAIN_STEP_RANGE))


def test_localise_prepare_predict_fills_every_row_at_points_near_the_truth(competition, trained, tmp_path):
    """predict with the competition attached finds localiser.keras beside the model, localises the test studies
    (as `localise` does), crops there and writes all 25 rows of every study; the points are in
    train_label_coordinates.csv's format and land near the phantom's true points."""
    output_dir = tmp_path / "predicted"
    argv = ["predict", "--model", str(trained / "model.keras"), "--data-dir", str(competition.root)]
    assert script.main([*argv, "--output-dir", str(output_dir)]) == 0
    submission = pd.read_csv(output_dir / "submission.csv", dtype={"row_id": str})
    expected = [f"{study}_{column}" for study in competition.test_study_ids for column in script.WIDE_LABEL_COLUMNS]
    assert sorted(submission["row_id"]) == sorted(expected)
    np.testing.assert_allclose(submission[list(script.CLASS_NAMES)].to_numpy().sum(axis=1), 1.0, atol=1e-6)
    constants = {
        key: np.array(value)
        for key, value in json.loads((trained / "config.json").read_text())["best_constants"].items()
    }
    at_constant = np.isclose(
        submission[list(script.CLASS_NAMES)].to_numpy(), script.constant_predictions(submission["row_id"], constants)
    ).all(axis=1)
    assert at_constant.mean() < 0.5  # Most rows were graded at found points.

    # Each found point on its slice and the neighbours its severity mixes in, weighted; the weights of a point sum
    # to 1, or to its chain_trust (< 1, the rest from the best constant) where the chain moved it off its peak.
    points = pd.read_csv(output_dir / "test_coordinates.csv")
    assert list(points.columns) == [*script.COORDINATE_COLUMNS, script.CROP_WEIGHT]
    assert set(points["study_id"]) == set(competition.test_study_ids)
    point = points.groupby(["study_id", "condition", "level"])
    totals = point[script.CROP_WEIGHT].sum()
    assert ((totals > 0) & (totals <= 1 + 1e-3)).all()
    assert (totals >= 1 - 1e-3).mean() >= 0.8, totals[totals < 1 - 1e-3]  # Most points are the chain's own peaks.
    assert (point.size() <= 3).all() and (point["instance_number"].nunique() == point.size()).all()
    read_back = script.read_coordinates(output_dir / "test_coordinates.csv")
    assert len(read_back) == len(points)  # Every slice of a point is kept, as a weighted label coordinate.
    heaviest = points.sort_values(script.CROP_WEIGHT).drop_duplicates(["study_id", "condition", "level"], keep="last")
    errors = world_errors(competition, heaviest)
    assert errors["mm"].median() <= MAXIMUM_MEDIAN_MM, errors.groupby("group")["mm"].median()


def test_localise_command_writes_the_same_points(competition, trained, tmp_path):
    """`localise` is the step predict takes: the same points, from the command line, in train_label_coordinates.csv's
    own format (one row each, on its slice)."""
    out = tmp_path / "points.csv"
    argv = ["localise", "--model", str(trained / "localiser.keras"), "--competition-dir", str(competition.root)]
    assert script.main([*argv, "--split", "test", "--out", str(out)]) == 0
    points = pd.read_csv(out)
    assert list(points.columns) == ["study_id", "series_id", "instance_number", "condition", "level", "x", "y"]
    assert len(points) > 0 and not points.duplicated(["study_id", "condition", "level"]).any()


def test_prepare_with_a_localiser_prints_no_tensorflow_device_line(competition, trained, tmp_path):
    """prepare --localiser runs a model, as localise does: TensorFlow's first look for a GPU (E0000 ... failed call
    to cuInit, on a machine without one) is kept out of stderr, where it used to be the only line."""
    command = [sys.executable, script.__file__, "prepare", "--competition-dir", str(competition.root)]
    command += ["--split", "test", "--out-dir", str(tmp_path / "prepared")]
    command += ["--localiser", str(trained / "localiser.keras")]
    environment = {name: value for name, value in os.environ.items() if name != "TF_CPP_MIN_LOG_LEVEL"}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stderr == ""
    assert (tmp_path / "prepared" / "test_coordinates.csv").is_file()


def test_a_found_points_severity_mixes_its_slice_and_the_neighbours_as_present_as_it():
    """Weights ∝ presence ** SLICE_MIX_POWER over the chosen slice and those beside it; a faint neighbour is left
    out, a slice two away never counts, and the chosen slice stays even when a neighbour outweighs it."""
    indices, presences = [3, 4, 5, 6, 7], [0.95, 0.1, 0.9, 0.9, 0.95]
    mixed = dict(script.mixed_slices(indices, presences, chosen=5))
    assert set(mixed) == {5, 6}  # 4 is too faint; 3 and 7 are two slices away.
    assert mixed[5] == pytest.approx(0.5, abs=1e-3) and sum(mixed.values()) == pytest.approx(1.0, abs=1e-3)
    mixed = dict(script.mixed_slices(indices, [0.5, 0.5, 0.2, 0.99, 0.5], chosen=5))
    assert 5 in mixed and mixed[6] > 0.9 and sum(mixed.values()) == pytest.approx(1.0, abs=1e-3)
    assert script.mixed_slices(indices, [0.0] * 5, chosen=5) == ((5, 1.0),)


def a_stack(slices):
    """A sagittal stack of `slices` headers 4 mm apart, with no files behind it: all that a point's row needs."""
    headers = tuple(
        script.SliceHeader(None, number + 1, (4.0 * number, 0.0, 0.0), (0, 1, 0, 0, 0, -1), (0.8, 0.8), (64, 64))
        for number in range(slices)
    )
    return script.Volume(script.Stack("7", headers), np.zeros((slices, 8, 8), np.uint8))


presences = st.one_of(st.floats(0, 1), st.sampled_from([0.0, 1e-30, 1e-6, 1.0, float("nan")]))


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 6).flatmap(lambda n: st.tuples(st.lists(presences, min_size=n, max_size=n), st.integers(0, n - 1))),
    st.one_of(st.just(1.0), st.floats(0.0, 1.0)),
)
def test_mixed_slices_always_round_trip_through_the_coordinates_reader(tmp_path_factory, case, trust):
    """Whatever the presences, whichever slice was chosen and however sure the chain is of the point, the mixed rows
    the localiser writes are read back whole by the coordinates reader (each weight a number > 0), the chosen slice
    among them, the weights summing to the point's trust."""
    slice_presences, chosen = case
    volume = a_stack(len(slice_presences))
    outputs = np.zeros((len(slice_presences), len(script.LOCALISER_CHANNELS), 3))
    outputs[:, 0] = [[0.5, 0.5, presence] for presence in slice_presences]
    seen = script.SlicesSeen(volume, list(range(len(outputs))), outputs)
    point = script.point_on(seen, chosen, 0, "spinal_canal_stenosis", "l1_l2", trust=trust)
    path = tmp_path_factory.mktemp("mixed") / "coordinates.csv"
    script.write_csv(script.localised_rows({"1": [point]}, mixed=True), path)
    read_back = script.read_coordinates(path)
    assert len(read_back) == len(point.slices) and chosen + 1 in set(read_back["instance_number"])
    assert (read_back[script.CROP_WEIGHT] > 0).all()
    assert read_back[script.CROP_WEIGHT].sum() == pytest.approx(trust, abs=1e-3)


def test_a_point_the_chain_moved_off_its_peak_is_graded_partly_as_its_best_constant():
    """chain_trust: the chain's own peak keeps the whole prediction, a place the map gives 0.3 of its peak's
    probability half of it (0.3 / CHAIN_TRUST_RATIO); row_probabilities gives the rest to the best constant, and a
    total short of 1 only by the weights' rounding counts as whole."""
    assert script.CHAIN_TRUST_RATIO == 0.6
    assert script.chain_trust(0.0) == 1.0 and script.chain_trust(np.log(0.7)) == 1.0
    assert script.chain_trust(np.log(0.3)) == pytest.approx(0.5)
    table = pd.DataFrame(
        {
            "row_id": [
                "1_spinal_canal_stenosis_l1_l2",
                "1_spinal_canal_stenosis_l2_l3",
                "1_spinal_canal_stenosis_l2_l3",
            ],
            "image_path": ["a.png", "b.png", "c.png"],
            script.CROP_WEIGHT: [0.5, 0.33335, 0.6666],
        }
    )
    constants = {"": [0.2, 0.3, 0.5], "spinal_canal_stenosis_l1_l2": [0.6, 0.2, 0.2]}
    images = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    row_ids, probabilities, shares = script.row_probabilities(table, images, constants)
    assert list(shares) == [0.5, 1.0]
    np.testing.assert_allclose(probabilities[0], [0.8, 0.1, 0.1])
    np.testing.assert_allclose(probabilities[1], [0.0, 0.33335 / 0.99995, 0.6666 / 0.99995])
    assert script.needs_constants(table) and not script.needs_constants(table.iloc[1:])


STEPS = [([0.0, 0.0, -35.0], [3.0, 3.0, 3.0])] * 4  # Each level 35 mm below the one above it.
RANGE = script.CHAIN_STEP_RANGE  # the step range of a localiser trained on labels like these (step_range)


def test_a_chain_keeps_two_levels_off_one_disc_where_their_own_peaks_would_share_it():
    """L3/L4's heatmap prefers the L2/L3 disc (score -0.1) to its own (-1.0): taken alone, two levels share a disc and
    the chain is broken; decoded jointly, each level takes its own disc and the chain holds."""
    discs = [np.array([0.0, 0.0, -35.0 * level]) for level in range(5)]
    candidates = [[(discs[level], -0.1)] for level in range(5)]
    candidates[2] = [(discs[1], -0.1), (discs[2], -1.0)]
    peaks = [max(offered, key=lambda place: place[1])[0] for offered in candidates]
    assert script.chain_broken(peaks, STEPS, RANGE)
    picks = script.best_chain(candidates, STEPS, RANGE)
    assert picks == [0, 0, 1, 0, 0]
    assert not script.chain_broken([candidates[level][pick][0] for level, pick in enumerate(picks)], STEPS, RANGE)


def test_a_chain_the_chosen_slices_cannot_hold_is_looked_for_on_the_other_slices_of_levels_the_presence_misses():
    """The presence put all five canal levels on slice 2, where every level's map peaks on one disc, off the chain:
    no chain there. On slice 4 each level's map peaks on its own disc, 36 mm below the one above. Where the presence
    sees no level anywhere (under CHAIN_UNSEEN_PRESENCE), the levels go to slice 4, as a chain; where it sees them,
    they stay on slice 2, each on its own peak."""
    count, size, cells = 6, 200, 50  # 1 mm pixels; heatmap cells of 4 px
    channels = script.KIND_CHANNELS["canal"]
    rows, columns = np.mgrid[0:cells, 0:cells]
    heatmaps = np.zeros((count, cells, cells, len(script.LOCALISER_CHANNELS)), np.float32)
    for level, channel in enumerate(channels):
        heatmaps[2, :, :, channel] = -((rows - 25) ** 2 + (columns - 25) ** 2) / 2.0
        heatmaps[4, :, :, channel] = -((rows - 4 - 9 * level) ** 2 + (columns - 25) ** 2) / 2.0
    stack = types.SimpleNamespace(
        shape=(size, size),
        positions=np.array([[4.0 * i, 0.0, 0.0] for i in range(count)]),
        normal=np.eye(3)[0],
        pixel_to_world=lambda index, x, y: np.array([4.0 * index, x, -y]),
    )
    volume = types.SimpleNamespace(stack=stack)
    localiser = types.SimpleNamespace(level_steps_mm={"spinal_canal_stenosis": STEPS}, chain_step_ranges=None)
    chosen = dict.fromkeys(script.LEVELS, 2)
    candidates = dict.fromkeys(script.LEVELS, range(count))
    for presence, found_on, ys, broken in (
        (0.05, 4, [18.0, 54.0, 90.0, 126.0, 162.0], False),
        (0.5, 2, [99.5] * 5, True),  # Each on its own output: the middle of slice 2.
    ):
        outputs = np.full((count, len(script.LOCALISER_CHANNELS), 3), 0.5)
        outputs[:, :, 2] = presence
        chains = []
        seen = script.SlicesSeen(volume, list(range(count)), outputs, heatmaps)
        points = script.chained_points(localiser, seen, "spinal_canal_stenosis", chosen, candidates, chains)
        assert [point.index for point in points] == [found_on] * 5
        assert [point.y for point in points] == pytest.approx(ys, abs=1.0)
        assert chains == [("spinal_canal_stenosis", True, broken)]


def test_a_step_four_tenths_longer_than_the_mean_breaks_the_chain():
    """Real spines' steps lie within 0.87-1.13 of the mean; a chain squeezed up one disc at its top (real MR's miscount:
    L1/L2 on T12/L1, L2/L3 on L1/L2's disc) has one step 1.37-1.49 times it, where the disc between was skipped."""
    mean = [0.0, 0.0, -35.0]
    assert script.plausible_steps(np.array([[0.0, 0.0, -35.0 * 0.75], [0.0, 0.0, -35.0 * 1.25]]), mean, RANGE).all()
    assert not script.plausible_steps(np.array([[0.0, 0.0, -35.0 * 1.4], [0.0, 0.0, -35.0 * 0.6]]), mean, RANGE).any()
    squeezed = [np.array([0.0, 0.0, z]) for z in (7.0, -34.0, -61.0, -113.0, -146.0)]  # steps 1.17, 0.77, 1.49, 0.94
    assert script.chain_broken(squeezed, STEPS, RANGE)


def chains_of(factors, count=100):
    """Labelled studies whose canal steps are 35 mm, but the last one 35 mm times each factor in turn."""
    studies = []
    for number in range(count):
        heights = np.cumsum([0.0, 35.0, 35.0, 35.0, 35.0 * factors[number % len(factors)]])
        points = {
            ("spinal_canal_stenosis", level): np.array([0.0, 0.0, -z]) for level, z in zip(script.LEVELS, heights)
        }
        studies.append(types.SimpleNamespace(points=points))
    return studies


def test_the_chains_step_range_widens_to_hold_the_labels_chains_within_its_limits():
    """Chains as even as healthy spines keep CHAIN_STEP_RANGE; chains whose last step is 0.55 or 1.45 times the mean
    widen it to hold them, so that a last step of 1.35 no longer breaks a chain, and one of 1.8 still does; steps of
    0.2 and 1.8 (a disc shared or skipped) widen it only to CHAIN_STEP_RANGE_LIMITS."""
    condition = "spinal_canal_stenosis"
    for factors, expected in (
        ([0.95, 1.05], script.CHAIN_STEP_RANGE),
        ([0.55, 1.45], (0.55, 1.45)),
        ([0.2, 1.8], script.CHAIN_STEP_RANGE_LIMITS),
    ):
        studies = chains_of(factors)
        ranges = script.learn_step_ranges(studies, script.learn_level_steps(studies))
        assert ranges[condition] == pytest.approx(expected, abs=0.01)
    widened = chains_of([0.55, 1.45])
    steps = script.learn_level_steps(widened)
    bounds = script.learn_step_ranges(widened, steps)[condition]
    longer, skipped = (
        [study.points[(condition, level)] for level in script.LEVELS] for study in chains_of([1.35, 1.8], count=2)
    )
    assert script.chain_broken(longer, steps[condition], RANGE)
    assert not script.chain_broken(longer, steps[condition], bounds)
    assert script.chain_broken(skipped, steps[condition], bounds)
    localiser = types.SimpleNamespace(level_steps_mm=steps, chain_step_ranges={condition: list(bounds)})
    assert script.step_range(localiser, condition) == tuple(bounds)
    assert script.step_range(types.SimpleNamespace(chain_step_ranges=None), condition) == script.CHAIN_STEP_RANGE


def test_a_conditions_slices_are_chosen_jointly_with_the_lateral_steps_the_labels_show():
    """Twelve sagittal slices 4 mm apart. Four canal levels are most present on slice 5; L5/S1 is most present on slice
    1 (16 mm to the right) but nearly as present on slice 7, 8 mm to the left, where the labels put L5/S1 (each
    step straight down, the last 8 mm to the left). Jointly, L5/S1 takes slice 7; without learned steps, slice 1."""
    positions = np.array([[4.0 * i, 0.0, 0.0] for i in range(12)])
    stack = types.SimpleNamespace(positions=positions, normal=np.eye(3)[0], slice_spacing=4.0)
    outputs = np.zeros((12, len(script.LOCALISER_CHANNELS), 3))
    outputs[:, :, 2] = 0.01
    outputs[5, 0:4, 2] = 0.95
    outputs[1, 4, 2], outputs[7, 4, 2] = 0.9, 0.6
    steps = {"spinal_canal_stenosis": STEPS[:3] + [([8.0, 0.0, -35.0], [3.0, 3.0, 3.0])]}
    every = {level: range(12) for level in script.LEVELS}
    localiser = types.SimpleNamespace(level_steps_mm=steps)
    seen = script.SlicesSeen(types.SimpleNamespace(stack=stack), list(range(12)), outputs)
    chosen = script.chained_slices(localiser, seen, "spinal_canal_stenosis", every)
    assert chosen == dict(zip(script.LEVELS, [5, 5, 5, 5, 7]))
    alone = script.chained_slices(types.SimpleNamespace(level_steps_mm=None), seen, "spinal_canal_stenosis", every)
    assert alone == dict(zip(script.LEVELS, [5, 5, 5, 5, 1]))


def symmetric_volume(centre, count=15, size=64, seed=0):
    """A sagittal stack of `count` slices 4 mm apart, 0.5 mm pixels, whose slices mirror each other about slice
    `centre` (a half-integer centre mirrors two slices onto each other): slice i shows the noise of its distance from
    it, so only mirror pairs about the centre correlate."""
    patterns = np.random.default_rng(seed).integers(0, 256, (2 * count, size, size)).astype(np.uint8)
    images = np.stack([patterns[int(abs(i - centre) * 2)] for i in range(count)])
    stack = types.SimpleNamespace(
        shape=(size, size),
        pixel_spacing=(0.5, 0.5),
        slice_spacing=4.0,
        positions=np.array([[4.0 * i, 0.0, 0.0] for i in range(count)]),
        normal=np.eye(3)[0],
    )
    return types.SimpleNamespace(stack=stack, images=images)


def test_a_level_moves_to_the_slice_its_anatomy_is_mirror_symmetric_about_where_it_is_present():
    """Every canal level is most present on slice 5; the anatomy is mirror-symmetric about slice 8, or about the
    midpoint of slices 8 and 9 (where the more present of the two wins). A level whose presence at the centre is
    under SYMMETRY_PRESENCE_FLOOR of its peak stays where it was, and so does a level on a stack without symmetry or
    with a gap between its slices."""
    count, channels = 15, script.KIND_CHANNELS["canal"]
    outputs = np.zeros((count, len(script.LOCALISER_CHANNELS), 3))
    outputs[:, channels, :2] = 0.5
    outputs[:, channels, 2] = 0.3
    outputs[5, channels, 2] = 0.9
    outputs[9, channels[4], 2] = 0.5  # L5/S1: slice 9 more present than slice 8.
    outputs[6:11, channels[0], 2] = 0.01  # L1/L2: barely present around slice 8.
    chosen = dict.fromkeys(script.LEVELS, 5)

    def moved(volume):
        seen = script.SlicesSeen(volume, list(range(count)), outputs)
        return script.symmetric_slices(seen, "spinal_canal_stenosis", chosen)

    assert moved(symmetric_volume(8)) == dict(zip(script.LEVELS, [5, 8, 8, 8, 8]))
    assert moved(symmetric_volume(8.5)) == dict(zip(script.LEVELS, [5, 8, 8, 8, 9]))
    flat = symmetric_volume(8)
    flat.images[:] = flat.images[0]  # Every slice alike: every centre as symmetric as the presence's pick.
    assert moved(flat) == chosen
    gap = symmetric_volume(8)
    gap.stack.positions[10:, 0] += 4.0  # One slice missing between slices 9 and 10: pairs by order are not mirrors.
    assert moved(gap) == chosen


def test_smoothed_presence_picks_the_middle_of_a_plateau_and_keeps_a_sharp_peak_in_any_stack_order():
    plateau = np.array([0.05, 0.9, 0.8, 0.8, 0.05])  # Most present at the plateau's edge, slice 1.
    for along in (np.arange(5.0), -np.arange(5.0) * 4.0):  # Slices stored head-first or foot-first along the normal.
        assert np.argmax(script.smoothed_presence(plateau, along)) == 2
    sharp = np.array([0.01, 0.01, 0.99, 0.01])
    assert np.argmax(script.smoothed_presence(sharp, np.array([3.0, 1.0, 2.0, 0.0]))) == 2
    assert np.allclose(script.smoothed_presence(np.full(4, 0.7), np.arange(4.0)), 0.7)


def test_a_chain_that_cannot_be_made_is_none_and_a_wrong_way_step_is_broken():
    discs = [np.array([0.0, 0.0, -35.0 * level]) for level in range(5)]
    on_one_disc = [[(discs[0], 0.0)] for _ in range(5)]
    assert script.best_chain(on_one_disc, STEPS, RANGE) is None
    assert script.chain_broken(discs[::-1], STEPS, RANGE) and not script.chain_broken(discs, STEPS, RANGE)


def test_heatmap_candidates_offer_every_levels_peak_refined_and_scored_by_this_level():
    """A slice's map for one level peaks at one cell and another level's at another: both are offered to the first
    level, its own peak first, each refined to the cell's centre (a symmetric peak) and scored by its own mass."""
    heatmaps = np.full((16, 16, 5), -10.0, np.float32)
    heatmaps[4, 6, 0], heatmaps[10, 6, 1] = 5.0, 5.0
    heatmaps[10, 6, 0] = 2.0  # Level 0 sees level 1's disc faintly.
    offered = script.heatmap_candidates(heatmaps, 0, range(5))
    (own_x, own_y), own_score = offered[0]
    assert (own_x, own_y) == pytest.approx(((6 + 0.5) / 16, (4 + 0.5) / 16), abs=1e-3)
    assert any(place == pytest.approx(((6 + 0.5) / 16, (10 + 0.5) / 16), abs=1e-2) for place, _ in offered[1:])
    assert own_score > max(score for _, score in offered[1:]) and own_score <= 0


def test_intensity_augmentation_changes_the_contrast_alike_in_every_channel_and_repeats_from_its_seed():
    image = np.dstack([np.tile(np.linspace(0, 255, 32, dtype=np.uint8), (32, 1))] * 3)
    varied = script.vary_intensity(image, np.random.default_rng(3), script.LOCALISER_INTENSITY_AUGMENTATION)
    again = script.vary_intensity(image, np.random.default_rng(3), script.LOCALISER_INTENSITY_AUGMENTATION)
    assert varied.dtype == np.uint8 and varied.shape == image.shape and np.array_equal(varied, again)
    assert np.abs(varied.astype(int) - image).mean() > 2
    # Only the noise differs between the channels.
    assert np.abs(varied[..., 0].astype(int) - varied[..., 1]).mean() < 0.1 * 255


def test_heatmap_candidates_at_the_maps_edge_are_refined_within_it():
    heatmaps = np.full((8, 8, 5), -10.0, np.float32)
    heatmaps[7, 0, 0] = 5.0
    (x, y), _ = script.heatmap_candidates(heatmaps, 0, range(5))[0]
    assert (x, y) == pytest.approx((0.5 / 8, 7.5 / 8), abs=1e-3)


def test_a_small_competition_still_gets_its_minimum_of_training_slices_an_epoch():
    """Two labelled studies with one series kind would make an epoch of four slices: the minimum repeats them."""
    studies = [
        script.LocaliserStudy(str(number), {"canal": [a_stack(5)]}, {("spinal_canal_stenosis", "l1_l2"): (8.0, 0, 0)})
        for number in range(2)
    ]
    _, options = script.parse_arguments([])
    settings = script.localiser_settings(options)
    few = replace(settings, localiser_slices_per_study=2, localiser_min_slices_per_epoch=0)
    assert len(script.LocaliserBatches(studies, few, augment=True).items) == 4
    assert (
        len(script.LocaliserBatches(studies, replace(few, localiser_min_slices_per_epoch=19), augment=True).items) == 20
    )
    assert len(script.LocaliserBatches(studies, few).items) == 2  # The statistics: one slice per study and kind.
