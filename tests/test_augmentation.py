"""Images as the model sees them: reading (bit depth, channel order, size) and augmentation, which must
match ImageDataGenerator's own apply_transform for the same random parameters."""

import cv2
import numpy as np
import pytest
from conftest import script

# Per image, on the 0-255 scale, over every pixel and channel (nothing excluded).
# Measured over 300 draws per shape: OpenCV 5.0 computes float coordinates exactly and stays within 0.0003
# of scipy everywhere; OpenCV 4.10 (the oldest requirements.txt allows is 4.9) rounds source coordinates to
# 1/32 pixel and reaches a mean of 0.038, a 99th percentile of 0.36 and a maximum of 0.76. The bounds leave
# about twice that room, and stay far below the error of a half-pixel slip (several gray levels).
MEAN_TOLERANCE = 0.1
PERCENTILE_99_TOLERANCE = 0.75
MAXIMUM_TOLERANCE = 1.5
RANDOM_DRAWS = 100

# Parameters that leave an image unchanged, in get_random_transform's layout.
IDENTITY = dict(
    theta=0.0,
    tx=0.0,
    ty=0.0,
    shear=0.0,
    zx=1.0,
    zy=1.0,
    flip_horizontal=False,
    flip_vertical=False,
    channel_shift_intensity=None,
    brightness=None,
)

# The legacy ImageDataGenerator path calls the deprecated scipy.ndimage.interpolation module.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def smooth_image(height, width):
    """Float32 RGB on 0-255: a horizontal ramp, a vertical ramp and a blurred off-centre disc.

    Smooth, so that bilinear resampling is compared and not aliasing; asymmetric, so that a wrong centre,
    axis or direction moves visible structure.
    """
    rows, columns = np.mgrid[0:height, 0:width].astype(np.float32)
    disc = np.zeros((height, width), np.float32)
    cv2.circle(disc, (width // 3, height // 2), min(height, width) // 5, 255.0, thickness=-1)
    disc = cv2.GaussianBlur(disc, (0, 0), sigmaX=3)
    return np.dstack([255 * columns / (width - 1), 255 * rows / (height - 1), disc]).astype(np.float32)


def noise_image(size):
    """Float32 RGB noise: every pixel distinct, so moving any pixel to the wrong place shows."""
    return np.random.default_rng(0).uniform(0, 255, (size, size, 3)).astype(np.float32)


def keras_transform(image, parameters):
    return script.augmentation_generator().apply_transform(image, parameters)


@pytest.mark.parametrize("height, width", [(64, 64), (48, 80), (80, 48)])
def test_random_augmentation_matches_image_data_generator(height, width):
    """For many random draws, OpenCV's warp equals ImageDataGenerator's within the tolerances above, also on
    non-square images, where Keras scales tx by the height yet shifts columns and centres at (h/2, w/2) in
    (x, y) order; script.py reproduces those conventions."""
    image = smooth_image(height, width)
    for seed in range(RANDOM_DRAWS):
        parameters = script.random_transform(image.shape, seed)
        difference = np.abs(script.apply_transform(image, parameters) - keras_transform(image, parameters))
        assert difference.mean() < MEAN_TOLERANCE, (seed, parameters)
        assert np.percentile(difference, 99) < PERCENTILE_99_TOLERANCE, (seed, parameters)
        assert difference.max() < MAXIMUM_TOLERANCE, (seed, parameters)


def shifted_columns(image, pixels):
    """The image moved `pixels` columns to the left, the right edge repeated ("nearest" fill)."""
    return image[:, np.clip(np.arange(image.shape[1]) + pixels, 0, image.shape[1] - 1)]


@pytest.mark.parametrize(
    "changes, expected",
    [
        pytest.param({}, lambda image: image, id="identity"),
        pytest.param({"flip_horizontal": True}, lambda image: image[:, ::-1], id="horizontal flip"),
        pytest.param({"theta": 90.0}, lambda image: np.rot90(image, 1), id="rotation by 90 degrees"),
        pytest.param({"theta": 180.0}, lambda image: image[::-1, ::-1], id="rotation by 180 degrees"),
        pytest.param(
            {"theta": 90.0, "flip_horizontal": True},
            lambda image: np.rot90(image, 1)[:, ::-1],
            id="rotation, then flip",
        ),
        # Keras' tx, although drawn from height_shift_range, moves columns.
        pytest.param({"tx": 3.0}, lambda image: shifted_columns(image, 3), id="shift by whole pixels"),
    ],
)
def test_exact_transforms_move_whole_pixels(changes, expected):
    """Flips, quarter turns and whole-pixel shifts only rearrange pixels: both implementations give exactly
    the rearranged image, so direction and order (flip after rotation) are pinned down independently."""
    image = noise_image(16)
    parameters = {**IDENTITY, **changes}
    np.testing.assert_allclose(script.apply_transform(image, parameters), expected(image), atol=1e-3)
    np.testing.assert_allclose(keras_transform(image, parameters), expected(image), atol=1e-3)


# --------------------------------------------------------------------------------------- image reading


@pytest.fixture
def gray_picture():
    """A smooth 8-bit grayscale picture, 48 px square, using most of the 0-255 range."""
    noise = np.random.default_rng(1).uniform(0, 255, (48, 48)).astype(np.float32)
    blurred = cv2.GaussianBlur(noise, (0, 0), sigmaX=2)
    stretched = (blurred - blurred.min()) / (blurred.max() - blurred.min()) * 255
    return np.rint(stretched).astype(np.uint8)


def write_png(path, pixels):
    assert cv2.imwrite(str(path), pixels)
    return str(path)


def read_both_bit_depths(directory, picture, image_size):
    """The picture read from an 8-bit PNG and from its 16-bit equivalent (each level × 257)."""
    eight_bit = write_png(directory / "eight_bit.png", picture)
    sixteen_bit = write_png(directory / "sixteen_bit.png", picture.astype(np.uint16) * 257)
    return script.read_image(eight_bit, image_size), script.read_image(sixteen_bit, image_size)


def test_sixteen_bit_reads_as_its_eight_bit_equivalent(gray_picture, tmp_path):
    """At the picture's own size, 16-bit and 8-bit read as the same float image on the 0-255 scale."""
    from_eight_bit, from_sixteen_bit = read_both_bit_depths(tmp_path, gray_picture, image_size=48)
    np.testing.assert_allclose(from_eight_bit[..., 0], gray_picture, atol=1e-3)
    np.testing.assert_allclose(from_sixteen_bit, from_eight_bit, atol=1e-3)


@pytest.mark.parametrize("image_size", [32, 64])
def test_sixteen_bit_resized_stays_within_one_level_of_eight_bit(gray_picture, tmp_path, image_size):
    """Resized, the two stay within one gray level: OpenCV resizes before the float conversion and rounds
    the 8-bit result to whole levels (up to 0.75 off with its fixed-point bilinear weights)."""
    from_eight_bit, from_sixteen_bit = read_both_bit_depths(tmp_path, gray_picture, image_size)
    np.testing.assert_allclose(from_sixteen_bit, from_eight_bit, atol=1.0)


BLUE = (0, 0, 255)  # In RGB order.


@pytest.mark.parametrize(
    "pixel, expected_rgb",
    [
        pytest.param(np.array([255, 0, 0], np.uint8), BLUE, id="BGR"),
        pytest.param(np.array([255, 0, 0, 128], np.uint8), BLUE, id="BGRA"),
        pytest.param(np.array([65535, 0, 0], np.uint16), BLUE, id="16-bit BGR"),
        pytest.param(np.array(100, np.uint8), (100, 100, 100), id="gray"),
    ],
)
def test_any_channel_layout_reads_as_rgb(pixel, expected_rgb, tmp_path):
    """Gray, BGR and BGRA files all become 3-channel RGB: a pure-blue BGR file is blue in channel 2."""
    path = write_png(tmp_path / "picture.png", np.tile(pixel, (8, 8, 1)).squeeze())
    image = script.read_image(path, 32)
    assert image.shape == (32, 32, 3) and image.dtype == np.float32
    np.testing.assert_allclose(image, np.broadcast_to(expected_rgb, image.shape), atol=1e-3)


@pytest.mark.parametrize("height, width", [(1, 1), (20, 90), (300, 40), (64, 64)])
@pytest.mark.parametrize("image_size", [32, 64])
def test_any_input_size_becomes_image_size_square(height, width, image_size, tmp_path):
    """Small, large and elongated pictures all come out image_size × image_size × 3, on the 0-255 scale."""
    picture = np.random.default_rng(2).integers(0, 256, (height, width), dtype=np.uint8)
    image = script.read_image(write_png(tmp_path / "picture.png", picture), image_size)
    assert image.shape == (image_size, image_size, 3)
    assert 0 <= image.min() and image.max() <= 255


def test_undecodable_image_raises_an_input_error_naming_it(tmp_path):
    """A file that breaks after the up-front check is still reported as bad input, by name."""
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"truncated")
    with pytest.raises(script.InputError, match="broken.png"):
        script.read_image(str(path), 32)


# --------------------------------------------------------------------------------------- the settings


def test_fill_mode_changes_the_filled_border():
    """fill_mode is honoured: "constant" fills what a shift uncovers with cval, "nearest" repeats the edge."""
    image = np.full((16, 16), 200, np.uint8)
    parameters = {**IDENTITY, "tx": 4.0}
    nearest = script.apply_transform(image, parameters, {"fill_mode": "nearest"})
    constant = script.apply_transform(image, parameters, {"fill_mode": "constant", "cval": 10})
    assert (nearest == 200).all()
    assert (constant[:, -4:] == 10).all() and (constant[:, :8] == 200).all()


def test_vertical_flip_is_honoured():
    image = noise_image(8)
    flipped = script.apply_transform(image, {**IDENTITY, "flip_vertical": True})
    np.testing.assert_allclose(flipped, image[::-1], atol=1e-3)


@pytest.mark.parametrize(
    "edit, named",
    [
        pytest.param({"brightness_range": (0.5, 1.5)}, "brightness_range", id="unknown key"),
        pytest.param({"fill_mode": "mirror"}, "'mirror'", id="unknown fill_mode"),
    ],
)
def test_augmentation_that_would_be_ignored_is_refused_by_name(edit, named, tmp_path, monkeypatch, capsys):
    """A setting apply_transform would not honour stops the run before anything is written, naming it."""
    for key, value in edit.items():
        monkeypatch.setitem(script.AUGMENTATION, key, value)
    output_dir = tmp_path / "output"
    exit_code = script.main(["--weights", "none", "--data-dir", str(tmp_path), "--output-dir", str(output_dir)])
    message = capsys.readouterr().err
    assert exit_code == 2 and "AUGMENTATION" in message and named in message
    assert not output_dir.exists()
