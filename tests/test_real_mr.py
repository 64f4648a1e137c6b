"""The real-MR competition builder (tests/real_mr_competition.py): the project reads its folder, the label points
land where the source volume's disc points are, and the images show what the tags say. Skipped without the data
(SPINE_MR_DIR, else <repository>/../shared/real/spine_mr). No training: a few seconds."""

import numpy as np
import pandas as pd
import pydicom
import pytest
import real_mr_competition as R
from conftest import nearest_slice
from conftest import script as P

TRAIN, TEST = [0, 1, 2], [28, 29]  # 29 has the scoliosis: its levels lie on many slices.
SEED = 3
# Tags are written to 4 (position) and 6 (spacing) decimals and read back before the labels are computed, and the
# labels are written to 6 decimals: a label maps back to its point's projection within this.
IN_PLANE_MM = 0.01

pytestmark = pytest.mark.skipif(
    R.data_path() is None, reason=f"real MR data absent: no {R.DATA_FILE} in {R.data_dir()}"
)


@pytest.fixture(scope="module")
def data():
    return R.load_data()


@pytest.fixture(scope="module")
def competition(tmp_path_factory, data):
    return R.write_real_mr_competition(tmp_path_factory.mktemp("real_mr"), TRAIN, TEST, seed=SEED, data=data)


def labels(competition):
    """Train labels and the test truth, as written, each with its split."""
    root = competition.root
    train = pd.read_csv(root / "train_label_coordinates.csv").assign(split="train")
    test = pd.read_csv(root / "_truth" / "test_label_coordinates.csv").assign(split="test")
    return pd.concat([train, test], ignore_index=True)


def stack_of(competition, split, study_id, series_id):
    stacks = P.read_stacks(competition.root / f"{split}_images" / str(study_id) / str(series_id))
    assert len(stacks) == 1
    return stacks[0]


def true_world(data, competition, study_id, level_number):
    """The source's disc point in world mm, from the npz and the builder's voxel → world map."""
    subject = competition.subjects[study_id]
    row, column, k = data["points"][subject, level_number]
    return competition.series[study_id].world(row, column, k)


def test_script_reads_the_folder(competition):
    root = competition.root
    coordinates = P.read_coordinates(root / "train_label_coordinates.csv")
    expected = {f"{study}_spinal_canal_stenosis_{level}" for study in competition.train_study_ids for level in P.LEVELS}
    assert set(coordinates["row_id"]) == expected
    truth = P.read_coordinates(root / "_truth" / "test_label_coordinates.csv")
    assert len(truth) == 5 * len(TEST)
    train_labels = P.read_labels(root / "train.csv")  # One-hot; the 20 blank columns read as NaN.
    spinal = train_labels[train_labels["row_id"].str.contains("spinal_canal")]
    assert len(spinal) == 5 * len(TRAIN) and (spinal["normal_mild"] == 1).all()
    assert train_labels.drop(spinal.index)[list(P.CLASS_NAMES)].isna().all().all()
    for split, ids in (("train", competition.train_study_ids), ("test", competition.test_study_ids)):
        series = P.study_series(P.read_series_descriptions(root, split))
        assert sorted(int(study) for study in series) == ids
        assert all(list(kinds) == ["canal"] for kinds in series.values())
        for study_id, kinds in series.items():
            stack = stack_of(competition, split, study_id, kinds["canal"][0])
            plan = competition.series[int(study_id)].plan
            assert 16 <= len(stack.slices) <= 21
            assert stack.slice_spacing == pytest.approx(plan.spacing, abs=1e-3)
            assert stack.pixel_spacing == pytest.approx((224 / plan.size,) * 2, abs=1e-5)
            assert stack.shape == (plan.size, plan.size)
            assert np.allclose(stack.row_direction, [0, 1, 0]) and np.allclose(stack.column_direction, [0, 0, -1])
            # Instance numbers are consecutive along the normal, one way or the other.
            numbers = np.array(stack.instance_numbers)
            assert sorted(numbers) == list(range(1, len(numbers) + 1))
            assert abs(np.diff(numbers)).max() == 1 and len(set(np.sign(np.diff(numbers)))) == 1
        headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in root.glob(f"{split}_images/*/*/*.dcm")]
        assert headers and not any("SliceThickness" in header or "SpacingBetweenSlices" in header for header in headers)
        assert {header.SeriesDescription for header in headers} == {"Sagittal T2/STIR"}


def test_label_points_map_to_the_true_points_on_their_nearest_slice(data, competition):
    rows = labels(competition)
    assert len(rows) == 5 * (len(TRAIN) + len(TEST))
    for row in rows.itertuples():
        stack = stack_of(competition, row.split, row.study_id, row.series_id)
        index = stack.instance_numbers.index(row.instance_number)
        world = stack.pixel_to_world(index, row.x, row.y)
        truth = true_world(data, competition, row.study_id, P.LEVELS.index(P.snake_case(pd.Series([row.level]))[0]))
        offset = truth - world
        along = offset @ stack.normal
        assert np.linalg.norm(offset - along * stack.normal) < IN_PLANE_MM  # In plane: the same point.
        assert abs(along) <= stack.slice_spacing / 2 + 1e-3  # Out of plane: no further than half a slice.
        distances = np.abs(stack.plane_distances(truth))
        assert int(np.argmin(distances)) == index  # On the nearest slice.
        if row.split == "test":
            assert [row.world_x, row.world_y, row.world_z] == pytest.approx(truth, abs=1e-5)
            assert abs(row.distance_to_slice) == pytest.approx(distances[index], abs=1e-3)
        # The project's own nearest_slice agrees on the slice and the pixel.
        found = nearest_slice([stack], truth)
        assert found[1] == index and found[2:4] == pytest.approx((row.x, row.y), abs=1e-3)


def test_levels_run_head_to_foot(competition):
    rows = labels(competition)
    for study_id, study in rows.groupby("study_id"):
        study = study.set_index("level").loc[[R.level_name(level) for level in P.LEVELS]]
        assert (np.diff(study["y"]) > 15 / 0.8).all(), study_id  # Rows grow downwards, discs 30-45 mm apart.
        if "world_z" in study and study["world_z"].notna().all():
            assert (np.diff(study["world_z"]) < -15).all(), study_id


def test_pixels_show_the_volume_as_the_tags_place_it(data, competition):
    """The slice a point is labelled on, resampled back to the 1 mm grid, matches the source volume's slice through
    that point, and matches it better than a flipped or shifted copy: the pixels agree with the geometry."""
    for study_id in competition.test_study_ids:
        series = competition.series[study_id]
        subject = competition.subjects[study_id]
        volume = data["volumes"][subject].astype(float)
        slice_ = min(series.slices, key=lambda each: abs(each.centre - data["points"][subject, 2, 2]))
        path = competition.root / "test_images" / str(study_id) / str(series.plan.series_id)
        image = pydicom.dcmread(path / f"{slice_.instance_number}.dcm").pixel_array.astype(np.float32)
        back = P.cv2.resize(image, (224, 224), interpolation=P.cv2.INTER_AREA) / series.plan.gain
        source = volume[:, :, int(round(slice_.centre))]

        def match(other, back=back):
            return np.corrcoef(back.ravel(), other.ravel())[0, 1]

        assert match(source) > 0.9
        assert match(source) > match(source[:, ::-1]) + 0.2
        assert match(source) > match(source[::-1]) + 0.2
        assert match(source) > match(np.roll(source, 6, axis=0)) + 0.05


def test_other_contrast_is_a_different_look_with_the_same_geometry(tmp_path, data, competition):
    other = R.write_real_mr_competition(tmp_path / "inverted", [], TEST[:1], seed=SEED, contrast="inverted", data=data)
    truth = pd.read_csv(competition.root / "_truth" / "test_label_coordinates.csv")
    truth_other = pd.read_csv(other.root / "_truth" / "test_label_coordinates.csv")
    columns = ["study_id", "instance_number", "x", "y", "world_x", "world_y", "world_z"]
    assert truth_other[columns].equals(truth[truth["study_id"] == other.test_study_ids[0]][columns])
    study_id = other.test_study_ids[0]
    instance = int(truth_other["instance_number"].iloc[2])

    def pixels(root, series_id):
        path = root / "test_images" / str(study_id) / str(series_id) / f"{instance}.dcm"
        return pydicom.dcmread(path).pixel_array.astype(float)

    water = pixels(competition.root, competition.series[study_id].plan.series_id)
    inverted = pixels(other.root, other.series[study_id].plan.series_id)
    body = inverted > 0
    assert 0.2 < body.mean() < 0.95
    assert np.corrcoef(water[body], inverted[body])[0, 1] < -0.5


def test_command_line_and_subject_ranges(tmp_path, data):
    assert R.parse_subjects("0-2,5, 7-8") == [0, 1, 2, 5, 7, 8] and R.parse_subjects("") == []
    assert R.main(["--out", str(tmp_path / "one"), "--train", "4", "--test", "5", "--seed", "1"]) == 0
    written = pd.read_csv(tmp_path / "one" / "train_label_coordinates.csv")
    assert set(written["study_id"]) == {R.study_id_of(4)}
    with pytest.raises(ValueError, match="one split"):
        R.write_real_mr_competition(tmp_path / "two", [1, 2], [2], data=data)
