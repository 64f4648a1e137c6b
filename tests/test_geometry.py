"""DICOM geometry for the level localiser: pixel ↔ world, slices sorted along their normal (not by InstanceNumber),
slice spacing from the positions, tilted axial sub-stacks, and the nearest slice to a world point across series."""

import anatomy_synthetic as A
import numpy as np
import pytest
from conftest import script

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
                stack, index, _, _, distance = script.nearest_slice(stacks, world)
                assert stack.series_id == str(int(point.series_id))
                assert stack.slices[index].instance_number == int(point.instance_number)
                assert abs(distance) == pytest.approx(abs(point.distance_to_slice), abs=0.01)
                checked += 1
    assert checked > 100
