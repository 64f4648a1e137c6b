"""The two training phases train exactly the intended layers, and BatchNormalization never learns (its statistics
recalibrated in one pass, traced once per model); predictions are never exactly 0, are a crop's and its mirror
image's mean, and every batch the network sees is full; the localiser's heatmap decoding and its presence read under
the heatmap."""

import types

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import script, seed_layout

IMAGE_SIZE = 32  # The smallest input ResNet50 accepts keeps each training step cheap.
# With FINE_TUNE_LAYERS = 10, the unfrozen tail is ResNet50's last residual block; its convolutions are the
# only base layers with weights left trainable (their BatchNormalization layers stay frozen).
LAST_BLOCK_CONVOLUTIONS = {"conv5_block3_1_conv", "conv5_block3_2_conv", "conv5_block3_3_conv"}


@pytest.fixture
def model():
    """A freshly built model in its phase 1 state: random weights, base frozen."""
    return script.build_model(IMAGE_SIZE, None, from_scratch=False)


def base_of(model):
    return model.get_layer("resnet50")


def head_layers(model):
    """Names of the layers after the base that hold weights: the two Dense layers."""
    return {layer.name for layer in model.layers if layer.weights and layer is not base_of(model)}


def is_batch_normalization(layer):
    return isinstance(layer, keras.layers.BatchNormalization)


def layers_with_trainable_weights(model):
    """Names of the layers, base layers included, that own at least one trainable weight."""
    return {variable.path.split("/")[-2] for variable in model.trainable_weights}


def snapshot(variables):
    return [np.array(variable) for variable in variables]


def train_one_batch(model, learning_rate):
    """Compile as the training phase does and take one step on a small random batch."""
    script.compile_model(model, learning_rate)
    # Eager execution skips tracing the training graph, which costs more than the step itself; the layers
    # receive the same training flags either way.
    model.run_eagerly = True
    generator = np.random.default_rng(0)
    images = generator.normal(0, 50, (4, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    labels = np.eye(len(script.CLASS_NAMES), dtype=np.float32)[[0, 1, 2, 0]]
    model.train_on_batch(images, labels)


def changed(before, after):
    return [not np.array_equal(old, new) for old, new in zip(before, after)]


def test_phase_one_trains_only_the_head(model):
    """With the base frozen, training changes every head weight and no base weight at all."""
    assert not base_of(model).trainable_weights
    assert layers_with_trainable_weights(model) == head_layers(model)
    base_before = snapshot(base_of(model).weights)
    head_before = snapshot(model.trainable_weights)
    train_one_batch(model, script.LEARNING_RATE)
    assert not any(changed(base_before, snapshot(base_of(model).weights)))
    assert all(changed(head_before, snapshot(model.trainable_weights)))


def test_phase_two_unfreezes_the_last_layers_except_batch_normalization(model):
    """Exactly the last FINE_TUNE_LAYERS base layers minus BatchNormalization become trainable, plus the head."""
    script.unfreeze_model(model, script.FINE_TUNE_LAYERS)
    base_layers = base_of(model).layers
    tail = base_layers[-script.FINE_TUNE_LAYERS :]
    expected = {layer.name for layer in tail if not is_batch_normalization(layer)}
    assert {layer.name for layer in base_layers if layer.trainable} == expected
    assert not any(layer.trainable for layer in base_layers if is_batch_normalization(layer))
    assert layers_with_trainable_weights(model) == LAST_BLOCK_CONVOLUTIONS | head_layers(model)


def test_batch_normalization_stays_in_inference_mode_in_phase_two(model):
    """Phase 2 training moves the unfrozen convolutions but leaves every BatchNormalization weight and
    moving statistic as it was: the layers normalise with their stored statistics, not the batch's."""
    script.unfreeze_model(model, script.FINE_TUNE_LAYERS)
    normalization_weights = [
        variable for layer in base_of(model).layers if is_batch_normalization(layer) for variable in layer.weights
    ]
    assert any("moving_mean" in variable.path for variable in normalization_weights)
    normalization_before = snapshot(normalization_weights)
    trainable_before = snapshot(model.trainable_weights)
    # A large learning rate makes any update visible; the rate of phase 2 does not matter for this check.
    train_one_batch(model, learning_rate=1e-2)
    assert not any(changed(normalization_before, snapshot(normalization_weights)))
    assert all(changed(trainable_before, snapshot(model.trainable_weights)))


class Batches(list):
    """A list of (images,) batches, indexable like ImageBatches."""


def test_recalibration_makes_inference_normalise_as_training_does():
    """After recalibrating on one batch, a from-scratch model's inference-mode base output equals its training-mode
    output on that batch: every BatchNormalization layer now holds exactly the statistics the batch produces."""
    model = script.build_model(IMAGE_SIZE, None, from_scratch=True)
    base = base_of(model)
    images = np.random.default_rng(1).normal(0, 50, (8, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    training_mode = base(images, training=True).numpy()

    def error():  # Of the inference-mode output, as a share of the largest training-mode value.
        return np.abs(base(images, training=False).numpy() - training_mode).max() / np.abs(training_mode).max()

    assert error() > 0.5  # The initial statistics (mean 0, variance 1) are far off.
    momentums = [layer.momentum for layer in script.learning_batch_normalizations(model)]
    script.recalibrate_batch_normalization(model, Batches([(images,)]))
    assert error() < 0.01  # Float32 rounding through 53 layers.
    assert [layer.momentum for layer in script.learning_batch_normalizations(model)] == momentums


def test_recalibration_averages_the_batch_statistics():
    """With several batches, the first layer's moving mean is the mean of its per-batch means."""
    model = script.build_model(IMAGE_SIZE, None, from_scratch=True)
    generator = np.random.default_rng(2)
    batches = Batches(
        [(generator.normal(offset, 50, (4, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32),) for offset in (-40, 0, 40)]
    )
    script.recalibrate_batch_normalization(model, batches)
    base = base_of(model)
    convolution = keras.Model(base.input, base.get_layer("conv1_conv").output)
    expected = np.mean([convolution(images).numpy().mean(axis=(0, 1, 2)) for (images,) in batches], axis=0)
    np.testing.assert_allclose(base.get_layer("conv1_bn").moving_mean.numpy(), expected, rtol=1e-4, atol=1e-4)


def test_precise_batch_norm_traces_the_network_once_per_model():
    """The statistics pass takes any batch size, so a short last batch does not trace the network again."""
    inputs = script.keras.Input((4, 4, 3))
    features = script.layers.BatchNormalization()(script.layers.Flatten()(inputs))
    model = script.keras.Model(inputs, script.layers.Dense(3, activation="softmax")(features))
    batches = [(np.random.default_rng(size).normal(size=(size, 4, 4, 3)).astype(np.float32),) for size in (8, 8, 3)]
    script.recalibrate_batch_normalization(model, batches)
    script.recalibrate_batch_normalization(model, batches)
    assert script.statistics_pass(model).experimental_get_tracing_count() == 1


class CertainModel:
    """A stand-in for a Keras model whose softmax rounded two classes to exactly 0, as float32 does for large
    logits. It records the batch sizes it was given."""

    input_shape = (None, 32, 32, 3)

    def __init__(self):
        self.batch_sizes = []

    def predict(self, batches, verbose=0):
        sizes = [len(batches[index][0]) for index in range(len(batches))]
        self.batch_sizes += sizes
        return np.tile(np.array([[1.0, 0.0, 0.0]], np.float32), (sum(sizes), 1))


@pytest.mark.parametrize("mirrored", [False, True])
def test_predictions_are_never_exactly_0_and_every_batch_is_full(tmp_path, mirrored):
    """Probabilities of exactly 0 become at least PREDICTION_FLOOR and still sum to 1; a short last batch is padded
    so that the predict function sees one shape (traced once), and the padding's predictions are dropped. Mirrored,
    the model's own predict is given each batch with its mirror images (no wrapping model is traced per call)."""
    root = seed_layout(tmp_path / "data")
    images = script.load_test_table(root)["image_path"].tolist() * 3  # 6 images in batches of 4: 4 and 2.
    model = CertainModel()
    options = types.SimpleNamespace(batch_size=4, workers=1, predict_mirrored=mirrored)
    probabilities, predicted = script.predict_probabilities(model, images, options)
    assert model.batch_sizes == ([8, 8] if mirrored else [4, 4])
    assert probabilities.shape == (6, 3) and predicted.all()
    assert probabilities.min() >= script.PREDICTION_FLOOR * 0.999
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0)


def test_a_crop_is_graded_as_the_mean_of_it_and_its_mirror_image(tmp_path):
    """--predict-mirrored: each crop's probabilities are the mean of the model's for it and for it mirrored (left
    and right swapped); --no-predict-mirrored: the model's own. The model here is not mirror-symmetric, so they
    differ. Graded study by study (Grader), as predict grades the hidden test, they are the same."""
    images = script.load_test_table(seed_layout(tmp_path / "data"))["image_path"].tolist()
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(keras.layers.Flatten()(inputs)))
    model.layers[-1].set_weights([np.random.default_rng(0).normal(size=(192, 3)) / 100, np.zeros(3)])
    graded = {
        mirrored: script.predict_probabilities(
            model, images, types.SimpleNamespace(batch_size=4, workers=1, predict_mirrored=mirrored)
        )[0]
        for mirrored in (True, False)
    }
    pixels = keras.applications.resnet50.preprocess_input(np.stack([script.read_image(path, 8) for path in images]))
    expected = (model.predict(pixels, verbose=0) + model.predict(pixels[:, :, ::-1], verbose=0)) / 2
    np.testing.assert_allclose(graded[True], script.floored(expected), atol=1e-5)
    np.testing.assert_allclose(graded[False], script.floored(model.predict(pixels, verbose=0)), atol=1e-5)
    assert np.abs(graded[True] - graded[False]).max() > 1e-3
    for mirrored in (True, False):  # predict's study-by-study grading (Grader) grades them alike.
        by_study = script.Grader([model], batch_size=3, mirrored=mirrored).probabilities(images)
        np.testing.assert_allclose(by_study, graded[mirrored], atol=1e-5)


class RecordingModel:
    """Stands in for a Keras model: records the batch sizes it is given and returns two outputs per image."""

    def __init__(self, jit_compile):
        self.jit_compile, self.batch_sizes = jit_compile, []

    def predict_on_batch(self, batch):
        self.batch_sizes.append(len(batch))
        return [batch.sum(axis=1), batch * 2]


@pytest.mark.parametrize("jit_compile, sizes", [(False, [16, 1]), (True, [16, 16])])
def test_a_last_short_batch_is_padded_only_where_xla_compiles_each_size(jit_compile, sizes):
    """predict_in_batches: without XLA a stack of 17 goes as 16 and 1 (no blank work); under XLA, which compiles a
    program per batch size, as 16 and 16, the padding's outputs dropped. Either way the same outputs, in order."""
    images = np.arange(17 * 3, dtype=np.float32).reshape(17, 3)
    model = RecordingModel(jit_compile)
    sums, doubled = script.predict_in_batches(model, images, 16)
    assert model.batch_sizes == sizes
    np.testing.assert_array_equal(sums, images.sum(axis=1))
    np.testing.assert_array_equal(doubled, images * 2)


def test_from_scratch_model_learns_everywhere_in_both_phases():
    """Without pretrained weights nothing is frozen: every layer trains in phase 1, and phase 2 changes nothing
    but the learning rate (there are no pretrained features to protect)."""
    model = script.build_model(IMAGE_SIZE, None, from_scratch=True)
    trainable = len(model.trainable_weights)
    assert all(layer.trainable for layer in base_of(model).layers)
    script.unfreeze_model(model, script.FINE_TUNE_LAYERS)
    assert len(model.trainable_weights) == trainable
    assert any(is_batch_normalization(layer) for layer in script.learning_batch_normalizations(model))


def two_peaks(strong, weak, size=16, channels=1):
    """Heatmap logits (1, size, size, channels) with a strong peak at cell `strong` and a weaker one at `weak`
    ((row, column) each), on a flat floor."""
    heatmaps = np.full((1, size, size, channels), -10.0, np.float32)
    heatmaps[0, strong[0], strong[1]] = 3.0
    heatmaps[0, weak[0], weak[1]] = 2.0
    return heatmaps


def test_found_points_sit_on_the_heatmaps_peak_not_between_two_peaks():
    """Training averages over the whole map, so a map torn between two discs gives a point between them; predicting
    averages near the stronger peak only, so the point lands on one disc."""
    layer = script.SpatialSoftArgmax(window=2)
    heatmaps = two_peaks(strong=(12, 8), weak=(3, 8))
    centre = (np.array([8, 12]) + 0.5) / 16  # (x, y) of the strong peak's cell, normalised
    trained = keras.ops.convert_to_numpy(layer(heatmaps, training=True))[0, 0]
    predicted = keras.ops.convert_to_numpy(layer(heatmaps, training=False))[0, 0]
    assert trained[1] < centre[1] - 0.1  # pulled a good way towards the weaker peak
    np.testing.assert_allclose(predicted, centre, atol=1e-4)
    # Saved and loaded, the layer keeps its window.
    assert script.SpatialSoftArgmax.from_config(layer.get_config()).window == 2


def test_presence_is_read_where_the_heatmap_puts_the_point_and_cannot_move_it():
    heatmaps = two_peaks(strong=(5, 5), weak=(5, 5))  # one peak
    presence_maps = np.full((1, 16, 16, 1), -4.0, np.float32)
    presence_maps[0, 5, 5] = 6.0
    layer = script.PresenceUnderHeatmap()
    assert float(keras.ops.convert_to_numpy(layer([heatmaps, presence_maps]))[0, 0]) > 5.5
    moved = np.roll(presence_maps, 4, axis=1)  # the same evidence, away from the point
    assert float(keras.ops.convert_to_numpy(layer([heatmaps, moved]))[0, 0]) < -3.5
    heatmaps = tf.Variable(heatmaps)
    with tf.GradientTape() as tape:
        presence = layer([heatmaps, presence_maps])
    gradient = tape.gradient(presence, heatmaps)
    assert gradient is None or not np.any(gradient.numpy())
