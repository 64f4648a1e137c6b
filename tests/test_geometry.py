"""DICOM geometry for the level localiser: pixel ↔ world, slices sorted along their normal (not by InstanceNumber),
slice spacing from the positions, tilted axial sub-stacks, and the nearest slice to a world point across series."""

import anatomy_synthetic as A
import numpy as np
import pytest
from conftest import nearest_slice, script

TRAIN_STUDIES, IMAGE_SIZE = 6, 96  # Six studies hold both instance orders and both axial layouts.


@pytest.fixture(scope="module")
def competition(tmp_path_factory):
    return A.write_anatomical_competition(
        tmp_path_factory.mktemp("geometry"), TRAIN_STUDIES, 0, seed=5, image_size=IMAGE_SIZE
    )


def series_dir(competition, row):
    return competition.root / "train_images" / str(row.study_id) / str(row.series_id)


def tilted_stack(rng):
    """A stack of five parallel slices at a random tilt and position, 0.7 × 0.8 mm pixels, 3.5 mm apart."""
    r = rng.normal(size=3)
    r /= np.linalg.norm(r)
    c = np.cross(r, rng.normal(size=3))
    c /= np.linalg.norm(c)
    normal = np.cross(r, c)
    corner = rng.uniform(-100, 100, 3)
    headers = [
        script.SliceHeader(None, 10 - index, tuple(corner + 3.5 * index * normal), (*r, *c), (0.7, 0.8), (64, 80))
        for index in range(5)
    ]
    return script.Stack("1", tuple(headers))


def test_pixel_to_world_to_pixel_round_trips():
    rng = np.random.default_rng(0)
    for _ in range(20):
        stack = tilted_stack(rng)
        index, x, y = int(rng.integers(5)), rng.uniform(0, 79), rng.uniform(0, 63)
        world = stack.pixel_to_world(index, x, y)
        back_x, back_y, distance = stack.world_to_pixel(world, index)
        assert (back_x, back_y) == pytest.approx((x, y), abs=1e-9)
        assert distance == pytest.approx(0, abs=1e-9)
        # One slice further along the normal, the same point is one spacing behind the plane.
        assert stack.world_to_pixel(world, index + 1 if index < 4 else index - 1)[2] == pytest.approx(
            -3.5 if index < 4 else 3.5
        )


def test_pixel_to_world_follows_the_dicom_formula():
    """P = IPP + x · Δcol · r + y · Δrow · c, with (Δrow, Δcol) = PixelSpacing."""
    stack = tilted_stack(np.random.default_rng(1))
    header = stack.slices[2]
    r, c = np.array(header.orientation[:3]), np.array(header.orientation[3:])
    expected = np.array(header.position) + 7 * 0.8 * r + 5 * 0.7 * c
    np.testing.assert_allclose(stack.pixel_to_world(2, 7, 5), expected)


def test_series_are_sorted_along_their_normal_whatever_the_instance_order(competition):
    sagittal = competition.series[competition.series["description"].str.startswith("Sagittal")]
    assert set(sagittal["order"]) == {"ascending", "descending"}
    for row in sagittal.itertuples():
        (stack,) = script.read_stacks(series_dir(competition, row))
        along = stack.positions @ stack.normal
        assert (np.diff(along) > 0).all()
        numbers = np.array(stack.instance_numbers)
        assert (np.diff(numbers) > 0).all() or (np.diff(numbers) < 0).all()
        assert stack.slice_spacing == pytest.approx(row.slice_spacing, abs=0.01)


def test_tilted_axial_blocks_become_one_stack_per_block(competition):
    axial = competition.series[competition.series["description"] == A.AXIAL_T2]
    assert set(axial["layout"]) == {"contiguous", "per-level blocks"}
    for row in axial.itertuples():
        stacks = script.read_stacks(series_dir(competition, row))
        assert sum(len(stack.slices) for stack in stacks) == row.slices
        if row.layout == "contiguous":
            assert len(stacks) == 1
        else:
            assert len(stacks) == len(row.levels.split())
        for stack in stacks:  # Within a stack, every slice is parallel to the first.
            assert all(
                np.allclose(header.orientation, stack.slices[0].orientation, atol=0.02) for header in stack.slices
            )


def test_nearest_slice_across_series_is_the_labelled_one(competition):
    """For every labelled point, the nearest slice among all series of its description is the one it is
    labelled on (the generator labels each point on exactly that slice)."""
    checked = 0
    for study_id in competition.train_study_ids:
        series = competition.series[competition.series["study_id"] == study_id]
        points = competition.points[
            (competition.points["study_id"] == study_id) & competition.points["series_id"].notna()
        ]
        for description in A.DESCRIPTIONS:
            rows = series[series["description"] == description]
            stacks = [stack for row in rows.itertuples() for stack in script.read_stacks(series_dir(competition, row))]
            conditions = [condition for condition, kind in A.LABEL_SERIES.items() if kind == description]
            for point in points[points["condition"].isin(conditions)].itertuples():
                world = np.array([point.world_x, point.world_y, point.world_z])
                stack, index, _, _, distance = nearest_slice(stacks, world)
                assert stack.series_id == str(int(point.series_id))
                assert stack.slices[index].instance_number == int(point.instance_number)
                assert abs(distance) == pytest.approx(abs(point.distance_to_slice), abs=0.01)
                checked += 1
    assert checked > 100


@pytest.fixture(scope="module")
def labelled_studies(competition):
    """Each study as the localiser reads it, with its labelled points in the world."""
    coordinates = script.read_coordinates(competition.root / "train_label_coordinates.csv")
    ids = sorted(set(coordinates["study_id"]))
    return script.read_localiser_studies(competition.root, "train", ids, 32, coordinates)


def test_the_spine_frame_runs_up_the_spine_to_the_left_and_back():
    """At every level: three unit directions at right angles; up follows the curve towards the head (+z), left is the
    patient's +x, and the third points backwards (+y)."""
    heights = 140.0 - 35.0 * np.arange(len(script.LEVELS))  # L1/L2 at the top.
    canal = {level: np.array([5.0, -0.004 * (z - 70.0) ** 2, z]) for level, z in zip(script.LEVELS, heights)}
    frames = script.spine_frames(canal)
    assert set(frames) == set(script.LEVELS)
    for frame in frames.values():
        np.testing.assert_allclose(frame.T @ frame, np.eye(3), atol=1e-9)
        up, left, back = frame.T
        assert up[2] > 0.9 and left[0] > 0.99 and back[1] > 0.9
    np.testing.assert_allclose(frames["l3_l4"], np.eye(3)[:, [2, 0, 1]], atol=1e-9)  # Upright at the curve's apex.
    assert script.spine_frames({"l1_l2": canal["l1_l2"]}) == {}  # One level shows no direction.


def turned(points, degrees):
    """Points turned about the patient's x axis (the spine leaning forwards or back) around their mean."""
    angle = np.radians(degrees)
    turn = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    centre = np.mean(list(points.values()), axis=0)
    return {key: centre + turn @ (point - centre) for key, point in points.items()}


@pytest.mark.parametrize("lean", [0, 25])
def test_learned_offsets_find_an_unseen_studys_foramina_and_recesses(labelled_studies, lean):
    """Offsets learned from the other studies' labels, in each level's spine frame, put a study's foramina and
    lateral recesses within a few millimetres of its labelled points, from its canal points alone, also when the
    whole study leans otherwise than any the offsets were learned from."""
    errors = []
    for study in labelled_studies:
        offsets = script.learn_offsets([other for other in labelled_studies if other is not study])
        points = turned(study.points, lean)
        canal = {key: point for key, point in points.items() if key[0] == "spinal_canal_stenosis"}
        expected = script.expected_points(canal, offsets)
        errors += [np.linalg.norm(expected[key] - point) for key, point in points.items() if key in expected]
    assert len(errors) > 100
    assert np.median(errors) < 3.0 and np.percentile(errors, 90) < 5.0, np.percentile(errors, [50, 90])


def test_a_point_is_present_on_its_labelled_slice_and_located_on_its_neighbours_too(labelled_studies):
    """slice_targets: a canal point is present on its labelled slice alone; its coordinates are taught there and on
    the slices either side (still within 1.5 spacings), not three slices away."""
    checked = 0
    for study in labelled_studies:
        for (condition, level), (volume, index) in study.labels.items():
            if condition != "spinal_canal_stenosis":
                continue
            channel = script.LOCALISER_CHANNELS.index((condition, level))
            for step in (-1, 0, 1, 3):
                if 0 <= index + step < len(volume.images):
                    targets = script.slice_targets(study, "canal", volume, index + step)[channel]
                    assert targets[script.PRESENCE_MASK] == 1
                    assert targets[script.PRESENCE] == (step == 0)
                    assert targets[script.COORDINATE_MASK] == (step != 3)
                    checked += 1
    assert checked > 50
