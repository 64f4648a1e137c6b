"""
RSNA 2024 Lumbar Spine Degenerative Classification, in one file.

Grades lumbar spine degeneration (Normal/Mild, Moderate, Severe) from MRI crops with an ImageNet ResNet50
and writes a Kaggle `submission.csv`. Run it as `python script.py`, or paste it into a notebook cell.

    python script.py                                  # train on ./train.csv, predict ./test.csv
    python script.py --weights none --image-size 64   # offline smoke run on the sample data
    python script.py predict --model model.keras      # submission from a saved model, no training
    python script.py score --solution S.csv --submission P.csv

The pipeline: validate the CSVs and every image up front; stream batches from disk with parallel workers
(OpenCV read → 3 channels → resize → ImageDataGenerator-style augmentation with cv2.warpAffine →
ResNet50 `preprocess_input`); train the head with the base frozen, then fine-tune the last base layers at a
lower learning rate with BatchNormalization in inference mode; keep the best weights by validation loss;
report the competition metric on the validation rows; predict the test set the same streaming way.

Evidence (2-core x86-64 CPU, no GPU, TF 2.21 / Keras 3.15): see the README's performance section.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # Keep TensorFlow's C++ start-up chatter out of the logs.

import argparse
import json
import math
import platform
import re
import sys
import threading
import time
from pathlib import Path

import cv2
import keras
import numpy as np
import pandas as pd
import sklearn
import tensorflow as tf
from keras import layers
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
from sklearn.model_selection import StratifiedGroupKFold

# ============================================================================================== config
# Plain defaults. Each is also a command-line option; in a notebook, edit them here or set sys.argv.

DATA_DIR = "."  # The folder with train.csv, test.csv and the images they name.
OUTPUT_DIR = "."  # Where submission.csv, model.keras and the logs are written.
IMAGE_SIZE = 224  # Pixels; every image is resized to IMAGE_SIZE × IMAGE_SIZE.
BATCH_SIZE = 32  # Images per step.
EPOCHS = 5  # Phase 1 epochs: the ResNet50 base is frozen and only the head learns.
FINE_TUNE_EPOCHS = 3  # Phase 2 epochs: the last FINE_TUNE_LAYERS base layers learn too. 0 skips phase 2.
LEARNING_RATE = 1e-3  # Adam, phase 1.
FINE_TUNE_LEARNING_RATE = 1e-5  # Adam, phase 2: small, so the pretrained features are nudged, not destroyed.
FINE_TUNE_LAYERS = 10  # Base layers unfrozen in phase 2 (their BatchNormalization layers stay frozen).
WEIGHTS = "imagenet"  # imagenet | none | a path to ResNet50 notop weights (.h5).
VAL_FRACTION = 0.2  # Share of training rows held out for validation (whole studies at a time).
FOLDS = 1  # K > 1: K models on grouped, stratified folds, out-of-fold predictions, test averaged over folds.
SEED = 42  # Makes splits, augmentation and initialisation repeatable.
WORKERS = os.cpu_count() or 1  # Threads that read and augment images in parallel.

# The seed's ImageDataGenerator augmentation, applied to training batches only.
# shear_range is in degrees in ImageDataGenerator, so 0.2 is a very light shear; kept for fidelity.
AUGMENTATION = dict(
    rotation_range=20,
    width_shift_range=0.2,
    height_shift_range=0.2,
    shear_range=0.2,
    zoom_range=0.2,
    horizontal_flip=True,
    fill_mode="nearest",
)

# Facts about the task. Each is defined once; everything else derives from these.
CLASS_NAMES = ("normal_mild", "moderate", "severe")  # Label and submission columns, in order.
SEVERITY_NAMES = ("Normal/Mild", "Moderate", "Severe")  # The competition's spelling of the same classes.
LABEL_WEIGHTS = (1.0, 2.0, 4.0)  # The competition metric's weight for each true class.
CLASS_WEIGHTS = LABEL_WEIGHTS  # Loss weight per true class: train to the metric by default.
CONDITIONS = (
    "spinal_canal_stenosis",
    "left_neural_foraminal_narrowing",
    "right_neural_foraminal_narrowing",
    "left_subarticular_stenosis",
    "right_subarticular_stenosis",
)
LEVELS = ("l1_l2", "l2_l3", "l3_l4", "l4_l5", "l5_s1")
# Metric groups: a row belongs to the group whose key its row_id contains.
CONDITION_GROUPS = {
    "spinal_canal_stenosis": "spinal",
    "neural_foraminal_narrowing": "foraminal",
    "subarticular_stenosis": "subarticular",
}
STUDY_PATTERN = re.compile(r"^(\d+)_")  # Row ids like 4003253_spinal_canal_stenosis_l1_l2 name their study.
IMAGENET_WEIGHTS_FILE = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
KAGGLE_INPUT = Path("/kaggle/input")
TRAIN_COLUMNS = ("row_id", "image_path", *CLASS_NAMES)
TEST_COLUMNS = ("row_id", "image_path")
SUBMISSION_COLUMNS = ("row_id", *CLASS_NAMES)
WIDE_LABEL_COLUMNS = tuple(f"{condition}_{level}" for condition in CONDITIONS for level in LEVELS)
PROBABILITY_EPSILON = 1e-15  # The official metric clips probabilities to [epsilon, 1 - epsilon].


class InputError(ValueError):
    """Bad user input: reported as one clear message and exit code 2, never a traceback."""


# ================================================================================================ data
# ------------------------------------------------------------------------- CSV loading and validation


def list_some(items, limit=20):
    """Name up to `limit` items for a message, then say how many more there are."""
    items = [str(item) for item in items]
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def read_csv(path):
    """Read a CSV with every cell as text, so row_ids like "007" or "NA" survive byte for byte.

    A UTF-8 byte-order mark and spaces around header names are tolerated; anything unreadable is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found. Check the path (for train/test files, --data-dir).")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as error:
        raise InputError(f"{path}: cannot be read as a UTF-8 CSV ({error}).") from None
    frame.columns = [str(column).strip() for column in frame.columns]
    return frame


def require_columns(path, frame, columns):
    """Refuse a table that lacks any of `columns`, naming them."""
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise InputError(
            f"{path}: missing column(s) {', '.join(missing)}. Expected: {', '.join(columns)}; "
            f"found: {', '.join(frame.columns)}."
        )


def refuse_duplicate_row_ids(path, frame):
    """Every row_id must be present and unique: submissions and labels are keyed by it."""
    empty = frame.index[frame["row_id"].str.strip() == ""]
    if len(empty):
        raise InputError(f"{path}: empty row_id on line(s) {list_some(empty + 2)}. Give every row an id.")
    duplicated = frame["row_id"][frame["row_id"].duplicated()].unique()
    if len(duplicated):
        raise InputError(f"{path}: duplicate row_id(s) {list_some(duplicated)}. Each row_id must be unique.")


def read_table(path, columns):
    """A CSV with the given columns and unique row_ids."""
    frame = read_csv(path)
    require_columns(path, frame, columns)
    refuse_duplicate_row_ids(path, frame)
    return frame


def parse_labels(path, frame):
    """The label columns as one-hot rows; all-blank rows become NaN, anything else is refused."""
    text = frame[list(CLASS_NAMES)].apply(lambda column: column.str.strip())
    blank = (text == "").all(axis=1).to_numpy()
    values = text.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64, copy=True)
    one_hot = np.isin(values, (0.0, 1.0)).all(axis=1) & (np.nansum(values, axis=1) == 1)
    bad = ~blank & ~one_hot
    if bad.any():
        raise InputError(
            f"{path}: label row(s) that are not one-hot ({', '.join(CLASS_NAMES)} must be 0/1 with exactly "
            f"one 1, or all blank): row_id {list_some(frame['row_id'][bad])}."
        )
    values[blank] = np.nan
    return values


def resolve_image_paths(data_dir, frame):
    """Image paths are relative to the data folder, or absolute. An empty path stays None."""
    return [str(data_dir / path) if path.strip() else None for path in frame["image_path"]]


def refuse_bad_images(path, frame, image_paths):
    """Check every image up front, cheaply: the file exists and OpenCV recognises its header."""
    missing, unreadable = [], []
    for row_id, image_path in zip(frame["row_id"], image_paths):
        if image_path is None:
            continue
        if not os.path.isfile(image_path):
            missing.append(f"{row_id} ({image_path})")
        elif os.path.getsize(image_path) == 0 or not cv2.haveImageReader(image_path):
            unreadable.append(f"{row_id} ({image_path})")
    problems = [f"missing: {list_some(missing)}"] if missing else []
    problems += [f"not a readable image: {list_some(unreadable)}"] if unreadable else []
    if problems:
        raise InputError(
            f"{path}: {len(missing) + len(unreadable)} image(s) cannot be used; "
            f"{'; '.join(problems)}. Restore the files or fix the image_path column."
        )


def load_train_table(data_dir):
    """train.csv with validated one-hot labels and images; rows whose labels are all blank are dropped."""
    path = data_dir / "train.csv"
    frame = read_table(path, TRAIN_COLUMNS)
    labels = parse_labels(path, frame)
    labelled = ~np.isnan(labels).any(axis=1)
    if not labelled.all():
        print(f"train.csv: dropped {int((~labelled).sum())} row(s) whose labels are all blank.")
    frame = frame[labelled].reset_index(drop=True)
    if frame.empty:
        raise InputError(f"{path}: no labelled rows. Each row needs a one-hot label.")
    no_image = frame["row_id"][frame["image_path"].str.strip() == ""]
    if len(no_image):
        raise InputError(f"{path}: empty image_path for row_id {list_some(no_image)}. Training rows need an image.")
    image_paths = resolve_image_paths(data_dir, frame)
    refuse_bad_images(path, frame, image_paths)
    return pd.DataFrame(
        {"row_id": frame["row_id"], "image_path": image_paths, "label": labels[labelled].argmax(axis=1)}
    )


def load_test_table(data_dir):
    """test.csv with validated images. An empty image_path means "no image" on purpose (a constant is used)."""
    path = data_dir / "test.csv"
    frame = read_table(path, TEST_COLUMNS)
    image_paths = resolve_image_paths(data_dir, frame)
    refuse_bad_images(path, frame, image_paths)
    return pd.DataFrame({"row_id": frame["row_id"], "image_path": image_paths})


def study_ids(row_ids):
    """The study of each row_id: the digits before the first "_" of `{study_id}_...` ids, else the row itself.

    For competition row_ids this is the official metric's study; other ids are each their own study.
    """
    row_ids = pd.Series(row_ids, dtype=str)
    return row_ids.str.extract(STUDY_PATTERN, expand=False).fillna(row_ids)


def locations(row_ids):
    """The location of each row_id, "{condition}_{level}": the text after its study (NaN when there is none)."""
    return pd.Series(row_ids, dtype=str).str.split("_", n=1).str[1]


def condition_groups(row_ids):
    """The metric group of each row_id ("spinal", "foraminal", "subarticular"), or "" when it names none."""
    row_ids = pd.Series(row_ids, dtype=str)
    matches = [row_ids.str.contains(condition, regex=False).to_numpy() for condition in CONDITION_GROUPS]
    return pd.Series(np.select(matches, list(CONDITION_GROUPS.values()), default=""), index=row_ids.index)


def labels_from_wide(frame):
    """The competition's wide train.csv (study_id + 25 severity columns) as long one-hot label rows.

    Returns row_id "{study_id}_{condition}_{level}" and the CLASS_NAMES columns, ordered by study and then
    by CONDITIONS × LEVELS. A blank severity becomes an all-NaN row, which is not scored or trained on.
    """
    require_columns("wide labels", frame, ("study_id", *WIDE_LABEL_COLUMNS))
    # Stacking gives the study-major order of the competition's own row_ids; pandas 3 keeps the blanks.
    by_study = frame.set_index(frame["study_id"].astype(str).str.strip())
    severities = by_study[list(WIDE_LABEL_COLUMNS)].stack().fillna("").astype(str).str.strip()
    class_indices = severities.map({name: index for index, name in enumerate(SEVERITY_NAMES)})
    refuse_unknown_severities(severities[class_indices.isna() & (severities != "")])
    one_hot = np.eye(len(CLASS_NAMES))[class_indices.fillna(0).astype(int)]
    one_hot[class_indices.isna().to_numpy()] = np.nan
    labels = pd.DataFrame(one_hot, columns=list(CLASS_NAMES))
    labels.insert(0, "row_id", severities.index.get_level_values(0) + "_" + severities.index.get_level_values(1))
    return labels


def refuse_unknown_severities(unknown):
    """Refuse severity texts other than SEVERITY_NAMES, naming each column, the texts and their study_ids."""
    if unknown.empty:
        return
    unknown = unknown.rename_axis(["study_id", "column"]).rename("severity").reset_index()
    details = "; ".join(
        f"column {column} has {list_some(sorted(set(rows['severity'])), limit=5)} "
        f"for study_ids {list_some(rows['study_id'])}"
        for column, rows in unknown.groupby("column", sort=False)
    )
    raise InputError(f"unknown severity values: {details}. Expected {', '.join(SEVERITY_NAMES)} or blank.")


def split_folds(table, folds, val_fraction, seed):
    """(train, validation) index pairs, stratified by class; all rows of a study stay on one side.

    With one fold, the holdout is one fold of round(1 / val_fraction), so the share is close to val_fraction.
    """
    if folds == 1 and val_fraction == 0:
        return [(np.arange(len(table)), np.arange(0))]
    splits = folds if folds > 1 else max(2, round(1 / val_fraction))
    groups = study_ids(table["row_id"]).to_numpy()
    if len(set(groups)) < splits:
        raise InputError(
            f"train.csv: {len(set(groups))} studies cannot be split into {splits} folds. "
            "Use fewer folds or a larger --val-fraction."
        )
    splitter = StratifiedGroupKFold(n_splits=splits, shuffle=True, random_state=seed)
    pairs = list(splitter.split(np.zeros(len(table)), table["label"], groups))
    return pairs if folds > 1 else pairs[:1]


# ------------------------------------------------------------------------------------- image reading


class UnreadableImageError(InputError):
    """An image that passed the up-front check but could not be decoded when it was needed."""


def read_image(path, image_size):
    """Any image OpenCV reads (8/16-bit; gray, BGR or BGRA) as float32 RGB in [0, 255], image_size square."""
    image = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise UnreadableImageError(f"{path}: cannot be decoded. Restore or replace the file, then run again.")
    # Scale by the type's full range, so a 16-bit image maps onto the same 0-255 scale as an 8-bit one.
    scale = 255.0 / np.iinfo(image.dtype).max if image.dtype.kind in "ui" else 255.0
    height, width = image.shape[:2]
    shrinking = height * width > image_size * image_size
    image = cv2.resize(
        image, (image_size, image_size), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    )
    image = image.astype(np.float32) * np.float32(scale)
    channels = 1 if image.ndim == 2 else image.shape[2]
    conversion = {1: cv2.COLOR_GRAY2RGB, 3: cv2.COLOR_BGR2RGB, 4: cv2.COLOR_BGRA2RGB}[channels]
    return cv2.cvtColor(image, conversion)


# -------------------------------------------------------------------------------------- augmentation

# ImageDataGenerator samples the parameters; OpenCV applies them about 14× faster than its scipy path.
image_data_generator = tf.keras.preprocessing.image.ImageDataGenerator(**AUGMENTATION)
# get_random_transform seeds NumPy's global generator, so threads take turns to keep draws repeatable.
sampling_lock = threading.Lock()


def random_transform(image_shape, seed):
    """ImageDataGenerator's own random parameters for one image, reproducible from `seed`."""
    with sampling_lock:
        return image_data_generator.get_random_transform(image_shape, seed=seed)


def affine_matrix(parameters, height, width):
    """The 2×3 inverse map for cv2.warpAffine that reproduces ImageDataGenerator.apply_transform.

    Keras composes rotation · shift · shear · zoom about the image centre and resamples with scipy in
    (row, column) order after swapping the axes of its matrix, so in OpenCV's (x, y) order the matrix is
    used as composed.
    """
    theta, shear = np.deg2rad(parameters["theta"]), np.deg2rad(parameters["shear"])
    rotation = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    shift = np.array([[1, 0, parameters["tx"]], [0, 1, parameters["ty"]], [0, 0, 1]])
    shearing = np.array([[1, -np.sin(shear), 0], [0, np.cos(shear), 0], [0, 0, 1]])
    zoom = np.array([[parameters["zx"], 0, 0], [0, parameters["zy"], 0], [0, 0, 1]])
    centre_x, centre_y = height / 2 - 0.5, width / 2 - 0.5  # Keras' transform_matrix_offset_center.
    to_centre = np.array([[1, 0, centre_x], [0, 1, centre_y], [0, 0, 1]])
    from_centre = np.array([[1, 0, -centre_x], [0, 1, -centre_y], [0, 0, 1]])
    return (to_centre @ rotation @ shift @ shearing @ zoom @ from_centre)[:2]


def apply_transform(image, parameters):
    """Apply ImageDataGenerator parameters with OpenCV: bilinear, edges repeated ("nearest" fill)."""
    height, width = image.shape[:2]
    image = cv2.warpAffine(
        image,
        affine_matrix(parameters, height, width),
        (width, height),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )
    return image[:, ::-1] if parameters["flip_horizontal"] else image


# ------------------------------------------------------------------------------------------ batching


class ImageBatches(keras.utils.PyDataset):
    """Streams batches from disk. Only paths and labels live in memory, so memory stays flat in dataset size.

    Yields (images,) for prediction, or (images, one-hot labels, sample weights) for training and validation.
    Training batches are shuffled and augmented, differently each epoch but repeatably from `seed`.
    """

    def __init__(self, image_paths, image_size, batch_size, labels=None, class_weights=None,
                 augment=False, seed=0, workers=1):
        super().__init__(workers=workers, use_multiprocessing=False, max_queue_size=2 * max(workers, 1))
        self.image_paths = list(image_paths)
        self.image_size = image_size
        self.batch_size = batch_size
        self.labels = None if labels is None else np.asarray(labels)
        self.class_weights = np.asarray(class_weights if class_weights is not None else LABEL_WEIGHTS, np.float32)
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.order = self.epoch_order()

    def epoch_order(self):
        """Training rows are visited in a fresh, seeded order every epoch."""
        if not self.augment:
            return np.arange(len(self.image_paths))
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.image_paths))

    def __len__(self):
        return math.ceil(len(self.image_paths) / self.batch_size)

    def load(self, row):
        """One preprocessed-to-be image; augmented with a seed unique to (seed, epoch, row)."""
        image = read_image(self.image_paths[row], self.image_size)
        if self.augment:
            seed = int(np.random.SeedSequence([self.seed, self.epoch, row]).generate_state(1)[0])
            image = apply_transform(image, random_transform(image.shape, seed))
        return image

    def __getitem__(self, index):
        rows = self.order[index * self.batch_size : (index + 1) * self.batch_size]
        images = keras.applications.resnet50.preprocess_input(np.stack([self.load(row) for row in rows]))
        if self.labels is None:
            return (images,)
        labels = self.labels[rows]
        one_hot = np.eye(len(CLASS_NAMES), dtype=np.float32)[labels]
        return images, one_hot, self.class_weights[labels]

    def on_epoch_end(self):
        self.epoch += 1
        self.order = self.epoch_order()


# =============================================================================================== model


def find_local_imagenet_weights():
    """A local copy of the ImageNet notop weights: the Keras cache, or any dataset under /kaggle/input."""
    keras_home = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))
    candidates = [keras_home / "models" / IMAGENET_WEIGHTS_FILE]
    if KAGGLE_INPUT.is_dir():  # Attached datasets sit a few folders deep; don't walk the DICOM trees.
        for depth in range(1, 5):
            candidates += sorted(KAGGLE_INPUT.glob("/".join(["*"] * depth) + "/" + IMAGENET_WEIGHTS_FILE))
    return next((path for path in candidates if path.is_file()), None)


def resolve_weights(choice):
    """(what ResNet50 should load, a sentence saying where it comes from) for --weights."""
    if choice.lower() == "none":
        return None, "none (random initialisation)"
    if choice.lower() == "imagenet":
        local = find_local_imagenet_weights()
        return (str(local), f"ImageNet, local copy {local}") if local else ("imagenet", "ImageNet, downloaded")
    path = Path(choice).expanduser()
    if not path.is_file():
        raise InputError(f"--weights {choice}: file not found. Pass imagenet, none, or a path to a weights file.")
    return str(path), f"file {path}"


def build_model(image_size, weights):
    """ResNet50 base, frozen, with the seed's head: Flatten → Dense(128, relu) → Dropout(0.5) → Dense(3)."""
    try:
        base = keras.applications.ResNet50(
            include_top=False, weights=weights, input_shape=(image_size, image_size, 3)
        )
    except Exception as error:  # A failed download or an incompatible file: both are the user's to fix.
        raise InputError(
            f"Could not load ResNet50 weights '{weights}' ({error}). Pass --weights PATH to a local "
            f"{IMAGENET_WEIGHTS_FILE}, or --weights none to start from random weights."
        ) from None
    base.trainable = False
    inputs = keras.Input(shape=(image_size, image_size, 3), name="image")
    # training=False keeps BatchNormalization in inference mode in both phases, as fine-tuning requires.
    features = base(inputs, training=False)
    features = layers.Flatten()(features)
    features = layers.Dense(128, activation="relu")(features)
    features = layers.Dropout(0.5)(features)
    # The softmax stays float32 even under mixed precision, so probabilities are exact enough to score.
    outputs = layers.Dense(len(CLASS_NAMES), activation="softmax", dtype="float32", name="severity")(features)
    return keras.Model(inputs, outputs, name="spine_severity")


def unfreeze_model(model, layer_count):
    """Phase 2: make the base's last `layer_count` layers trainable, except BatchNormalization."""
    base = model.get_layer("resnet50")
    base.trainable = True
    for index, layer in enumerate(base.layers):
        in_top = index >= len(base.layers) - layer_count
        layer.trainable = in_top and not isinstance(layer, layers.BatchNormalization)


def compile_model(model, learning_rate):
    """Adam on (class-weighted) categorical cross-entropy. Call again after changing `trainable`."""
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="categorical_crossentropy",
        metrics=["accuracy"],
    )


# ============================================================================================ training


def make_batches(table, rows, options, augment=False, with_labels=True):
    """The streaming dataset for some rows of a table."""
    return ImageBatches(
        table["image_path"].to_numpy()[rows],
        options.image_size,
        options.batch_size,
        labels=table["label"].to_numpy()[rows] if with_labels else None,
        class_weights=options.class_weights,
        augment=augment,
        seed=options.seed,
        workers=options.workers,
    )


def fit_phase(model, train_batches, validation_batches, options, first_epoch, last_epoch, checkpoint, best):
    """Train epochs [first_epoch, last_epoch), saving weights whenever validation loss beats `best`."""
    callbacks = []
    if validation_batches is not None:
        callbacks.append(
            keras.callbacks.ModelCheckpoint(
                checkpoint, monitor="val_loss", save_best_only=True, save_weights_only=True,
                initial_value_threshold=best, verbose=0,
            )
        )
    history = model.fit(
        train_batches,
        validation_data=validation_batches,
        initial_epoch=first_epoch,
        epochs=last_epoch,
        callbacks=callbacks,
        shuffle=False,  # ImageBatches shuffles itself, from the seed.
        verbose=1 if sys.stdout.isatty() else 2,
    )
    if checkpoint.exists():
        model.load_weights(checkpoint)  # The best epoch so far: phase 2 starts from it, and the run ends on it.
    frame = pd.DataFrame(history.history)
    frame.insert(0, "epoch", history.epoch)
    return frame, callbacks[0].best if callbacks else best


def train_fold(table, train_rows, validation_rows, options, weights, checkpoint):
    """Both training phases for one split; returns the model with its best weights, and its history."""
    train_batches = make_batches(table, train_rows, options, augment=True)
    validation_batches = make_batches(table, validation_rows, options) if len(validation_rows) else None
    model = build_model(options.image_size, weights)
    compile_model(model, options.lr)
    checkpoint.unlink(missing_ok=True)  # A stale checkpoint from another run must not be restored.
    print(f"phase 1: base frozen, {options.epochs} epoch(s) at learning rate {options.lr:g}")
    history, best = fit_phase(model, train_batches, validation_batches, options, 0, options.epochs, checkpoint, None)
    history.insert(0, "phase", 1)
    if options.fine_tune_epochs > 0:
        unfreeze_model(model, FINE_TUNE_LAYERS)
        compile_model(model, options.fine_tune_lr)
        print(f"phase 2: last {FINE_TUNE_LAYERS} base layers unfrozen (BatchNormalization frozen), "
              f"{options.fine_tune_epochs} epoch(s) at learning rate {options.fine_tune_lr:g}")
        last_epoch = options.epochs + options.fine_tune_epochs
        fine_tune_history, best = fit_phase(
            model, train_batches, validation_batches, options, options.epochs, last_epoch, checkpoint, best
        )
        fine_tune_history.insert(0, "phase", 2)
        history = pd.concat([history, fine_tune_history], ignore_index=True)
    if checkpoint.exists():
        checkpoint.unlink()  # model.keras holds the best weights from here on.
    return model, history


def predict_probabilities(model, image_paths, options):
    """Softmax probabilities for images, streamed in order."""
    if len(image_paths) == 0:
        return np.zeros((0, len(CLASS_NAMES)), np.float32)
    batches = ImageBatches(image_paths, model.input_shape[1], options.batch_size, workers=options.workers)
    return model.predict(batches, verbose=0).astype(np.float64)


# ========================================================================================== evaluation

# The competition metric: a class-weighted log loss per condition group, plus a per-study "any severe
# spinal stenosis" binary log loss, averaged with equal weight. Lower is better. Labels and predictions are
# long frames keyed by row_id, with one column per class; all-blank label rows are not scored.


def clip_and_normalise(probabilities):
    """Clips each row to [1e-15, 1 - 1e-15] and then rescales it to sum to 1, in the official metric's order."""
    clipped = np.clip(probabilities, PROBABILITY_EPSILON, 1 - PROBABILITY_EPSILON)
    return clipped / clipped.sum(axis=1, keepdims=True)


def aligned_probabilities(row_ids, predictions):
    """The predicted CLASS_NAMES probabilities for each row_id, in that order; every row_id must be predicted."""
    missing = row_ids[~row_ids.isin(predictions["row_id"])]
    if not missing.empty:
        raise InputError(f"the submission lacks {len(missing)} solution row_ids: {list_some(missing)}")
    return predictions.set_index("row_id").loc[row_ids, list(CLASS_NAMES)].to_numpy(dtype=float)


def scored_rows(labels, predictions):
    """One row per labelled row_id with its study, group, severity, weight, log loss and severe probability."""
    labels = labels[labels[list(CLASS_NAMES)].notna().any(axis=1)]
    if labels.empty:
        raise InputError("the solution has no labelled rows to score")
    row_ids = labels["row_id"].reset_index(drop=True)
    probabilities = clip_and_normalise(aligned_probabilities(row_ids, predictions))
    true_classes = labels[list(CLASS_NAMES)].to_numpy().argmax(axis=1)
    return pd.DataFrame({
        "row_id": row_ids,
        "study_id": study_ids(row_ids),
        "group": condition_groups(row_ids),
        "is_severe": true_classes == CLASS_NAMES.index("severe"),
        "weight": np.asarray(LABEL_WEIGHTS)[true_classes],
        "loss": -np.log(probabilities[np.arange(len(row_ids)), true_classes]),
        "severe_probability": probabilities[:, CLASS_NAMES.index("severe")],
    })


def weighted_log_loss(rows):
    """The weighted mean of the rows' log losses: sum(weight * loss) / sum(weight)."""
    return float(np.average(rows["loss"], weights=rows["weight"]))


def any_severe_spinal_loss(spinal_rows):
    """The weighted binary log loss, over studies, of "does this study have a severe spinal level?".

    A study's label is whether any level is severe, its prediction the largest severe probability, and its
    weight the largest row weight among its spinal rows.
    """
    studies = spinal_rows.groupby("study_id")[["is_severe", "severe_probability", "weight"]].max()
    is_severe = studies["is_severe"].to_numpy(dtype=float)
    probability = studies["severe_probability"].to_numpy()
    losses = -(is_severe * np.log(probability) + (1 - is_severe) * np.log1p(-probability))
    return float(np.average(losses, weights=studies["weight"]))


def score_predictions(labels, predictions):
    """Scores predictions against labels with the competition metric; both are long frames keyed by row_id.

    `labels` holds row_id and one-hot CLASS_NAMES columns (all-NaN rows are skipped); `predictions` holds
    row_id and CLASS_NAMES probabilities, in any order, and may have extra rows. Row_ids are unique in each.
    Returns "score" followed by "spinal", "foraminal", "subarticular" and "any_severe_spinal" for the groups
    present. When no row_id names a condition, "score" is the weighted log loss over all rows and the only key.
    """
    rows = scored_rows(labels, predictions)
    unnamed = rows.loc[rows["group"] == "", "row_id"]
    if len(unnamed) == len(rows):
        return {"score": weighted_log_loss(rows)}
    # Scoring a mix would quietly give the unnamed rows a different weight from the rest, so refuse it.
    if not unnamed.empty:
        raise InputError(
            f"{len(unnamed)} row_ids name none of the conditions {', '.join(CONDITION_GROUPS)} "
            f"while the others do: {list_some(unnamed)}"
        )
    groups_present = [group for group in CONDITION_GROUPS.values() if (rows["group"] == group).any()]
    components = {group: weighted_log_loss(rows[rows["group"] == group]) for group in groups_present}
    if "spinal" in components:
        components["any_severe_spinal"] = any_severe_spinal_loss(rows[rows["group"] == "spinal"])
    return {"score": float(np.mean(list(components.values()))), **components}


def best_constant_prediction(labels, class_weights=LABEL_WEIGHTS):
    """The class distribution that minimises the weighted log loss over one-hot `labels`, as an array of 3.

    A constant p minimises Σ_c weight_c · count_c · −log p_c at p_c ∝ weight_c · count_c: the class
    frequencies times the metric's weights, renormalised. Weights (1, 1, 1) give the plain frequencies.
    """
    weighted = labels[list(CLASS_NAMES)].mean().to_numpy() * np.asarray(class_weights)
    return weighted / weighted.sum()


def best_constants(labels, class_weights=LABEL_WEIGHTS):
    """The best constant for each location (condition and level) in `labels`, and overall under "".

    One constant per location is the baseline competitors quote: on the real train.csv it scores 0.790,
    against 0.931 for the plain frequencies (one global constant: 0.920).
    """
    constants = {"": best_constant_prediction(labels, class_weights)}
    for location, location_labels in labels.groupby(locations(labels["row_id"])):
        constants[location] = best_constant_prediction(location_labels, class_weights)
    return constants


def constant_predictions(row_ids, constants):
    """Each row's location's constant, or the overall one for a location not seen in training."""
    return np.array([constants.get(location, constants[""]) for location in locations(row_ids).fillna("")])


def read_solution(path):
    """Labels from a long CSV (row_id + one-hot CLASS_NAMES) or the competition's wide train.csv."""
    frame = read_csv(path)
    if "row_id" not in frame.columns and "study_id" in frame.columns:
        labels = labels_from_wide(frame)
    else:
        require_columns(path, frame, ("row_id", *CLASS_NAMES))
        labels = pd.DataFrame(parse_labels(path, frame), columns=list(CLASS_NAMES))
        labels.insert(0, "row_id", frame["row_id"])
    refuse_duplicate_row_ids(path, labels)
    return labels


def read_submission(path):
    """Predictions (row_id + CLASS_NAMES probabilities); every probability must be a finite, non-negative number."""
    frame = read_table(path, SUBMISSION_COLUMNS)
    probabilities = frame[list(CLASS_NAMES)].apply(lambda column: pd.to_numeric(column.str.strip(), errors="coerce"))
    for column in CLASS_NAMES:
        invalid = frame["row_id"][~(np.isfinite(probabilities[column]) & (probabilities[column] >= 0))]
        if len(invalid):
            raise InputError(
                f"{path}: column {column} needs finite, non-negative probabilities; "
                f"{len(invalid)} row(s) have a blank, text, infinite or negative value: {list_some(invalid)}."
            )
    return pd.concat([frame["row_id"], probabilities], axis=1)


def format_score_table(scores):
    """The metric's components and the overall score, as a short table."""
    if list(scores) == ["score"]:
        return f"row_ids name no condition, so the score is the weighted log loss over all rows: {scores['score']:.4f}"
    components = [name for name in scores if name != "score"]
    lines = [f"  {name:<20} {scores[name]:.4f}" for name in components]
    lines.append(f"  {'score':<20} {scores['score']:.4f}  (mean of the {len(components)} above; lower is better)")
    return "\n".join(["competition metric (weighted log loss):", *lines])


def run_score(solution_path, submission_path):
    """`score`: print the components, then the scores as one JSON object on the last line; return them."""
    scores = score_predictions(read_solution(solution_path), read_submission(submission_path))
    print(format_score_table(scores))
    print(json.dumps(scores))
    return scores


def labels_frame(row_ids, labels):
    """row_id + one-hot label columns, the layout the metric reads."""
    frame = pd.DataFrame(np.eye(len(CLASS_NAMES))[labels], columns=list(CLASS_NAMES))
    frame.insert(0, "row_id", list(row_ids))
    return frame


def probabilities_frame(row_ids, probabilities):
    """row_id + probability columns: the submission layout."""
    frame = pd.DataFrame(np.asarray(probabilities, np.float64), columns=list(CLASS_NAMES))
    frame.insert(0, "row_id", list(row_ids))
    return frame


def evaluate(row_ids, labels, probabilities, constant_probabilities):
    """Validation metrics: the competition score and its parts, accuracy, a per-class table, the confusion
    matrix, and the score of the best constant prediction (the prior the model has to beat)."""
    truth = labels_frame(row_ids, labels)
    predicted = probabilities.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=range(len(CLASS_NAMES)), zero_division=0
    )
    constant_score = score_predictions(truth, probabilities_frame(row_ids, constant_probabilities))
    return {
        **score_predictions(truth, probabilities_frame(row_ids, probabilities)),
        "best_constant_score": constant_score["score"],
        "accuracy": float((predicted == labels).mean()),
        "rows": int(len(labels)),
        "per_class": {
            name: {"precision": float(precision[k]), "recall": float(recall[k]), "f1": float(f1[k]),
                   "support": int(support[k])}
            for k, name in enumerate(CLASS_NAMES)
        },
        "confusion_matrix": confusion_matrix(labels, predicted, labels=range(len(CLASS_NAMES))).tolist(),
    }


def print_report(metrics):
    """The table a competitor reads first: does the model beat the best constant?"""
    components = [key for key in ("spinal", "foraminal", "subarticular", "any_severe_spinal") if key in metrics]
    print(f"\nvalidation ({metrics['rows']} rows)")
    print(f"  score (weighted log loss, lower is better)  {metrics['score']:.4f}")
    for key in components:
        print(f"    {key:<41}{metrics[key]:.4f}")
    print(f"  best constant prediction                    {metrics['best_constant_score']:.4f}")
    print(f"  accuracy                                    {metrics['accuracy']:.4f}")
    print(f"\n  {'class':<12}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}")
    for name, row in metrics["per_class"].items():
        print(f"  {name:<12}{row['precision']:>10.3f}{row['recall']:>10.3f}{row['f1']:>10.3f}{row['support']:>10}")
    print(f"\n  confusion matrix (rows: true, columns: predicted)\n  {'':<12}" + "".join(f"{n:>12}" for n in CLASS_NAMES))
    for name, row in zip(CLASS_NAMES, metrics["confusion_matrix"]):
        print(f"  {name:<12}" + "".join(f"{count:>12}" for count in row))


def save_plots(history, metrics, output_dir):
    """training_curves.png and confusion_matrix.png, also shown inline in a notebook. Skipped without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed, so the plots were skipped (pip install matplotlib).")
        return {}
    if not in_notebook():
        matplotlib.use("Agg")  # Draw to files only; a terminal or CI has no display.
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    curves, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, metric, title in zip(axes, ("loss", "accuracy"), ("loss (class-weighted cross-entropy)", "accuracy")):
        for fold, rows in history.groupby("fold"):
            line = axis.plot(rows["epoch"] + 1, rows[metric], "-o", label=f"fold {fold} training")[0]
            if f"val_{metric}" in rows:
                axis.plot(rows["epoch"] + 1, rows[f"val_{metric}"], "--o", color=line.get_color(),
                          label=f"fold {fold} validation")
        if (history["phase"] == 2).any():
            axis.axvline(history.loc[history["phase"] == 2, "epoch"].min() + 0.5, color="gray", linestyle=":",
                         label="fine-tuning starts")
        axis.set(title=title, xlabel="epoch")
        axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        axis.legend(fontsize="small")

    matrix, axis = plt.subplots(figsize=(5, 4.5))
    counts = np.array(metrics["confusion_matrix"])
    axis.imshow(counts, cmap="Blues")
    axis.set(xticks=range(len(CLASS_NAMES)), yticks=range(len(CLASS_NAMES)), xticklabels=CLASS_NAMES,
             yticklabels=CLASS_NAMES, xlabel="predicted", ylabel="true", title="validation confusion matrix")
    for (true, predicted), count in np.ndenumerate(counts):
        axis.text(predicted, true, count, ha="center", va="center",
                  color="white" if count > counts.max() / 2 else "black")

    paths = {}
    for name, figure in (("training_curves", curves), ("confusion_matrix", matrix)):
        figure.tight_layout()
        paths[name] = output_dir / f"{name}.png"
        write_atomically(paths[name], figure.savefig)
        if in_notebook():
            from IPython.display import display

            display(figure)
        plt.close(figure)
    return paths


# ============================================================================ prediction and submission


def write_atomically(path, write):
    """Write through a temporary file in the same folder, then rename: a crash never leaves a truncated file."""
    path = Path(path)
    temporary = path.with_name(f".partial-{os.getpid()}-{path.name}")  # Keeps the suffix Keras and pandas read.
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_csv(frame, path):
    write_atomically(path, lambda temporary: frame.to_csv(temporary, index=False))
    return path


def write_json(data, path):
    write_atomically(path, lambda temporary: temporary.write_text(json.dumps(data, indent=2) + "\n"))
    return path


def fill_rows_without_image(test_table, image_probabilities, constants):
    """All test rows' probabilities: the models' for rows with an image, the best constant for the rest."""
    has_image = test_table["image_path"].notna().to_numpy()
    probabilities = np.empty((len(test_table), len(CLASS_NAMES)))
    probabilities[has_image] = image_probabilities
    if not has_image.all():
        print(f"test.csv: {int((~has_image).sum())} row(s) without an image get their location's best constant.")
        probabilities[~has_image] = constant_predictions(test_table["row_id"][~has_image], constants)
    return probabilities


def write_submission(row_ids, probabilities, path):
    """submission.csv: test.csv's row_ids in test.csv's order, finite probabilities that sum to 1."""
    probabilities = np.asarray(probabilities, np.float64)
    if not np.isfinite(probabilities).all():
        raise RuntimeError("The model produced non-finite probabilities; the submission was not written.")
    probabilities = probabilities / probabilities.sum(axis=1, keepdims=True)
    return write_csv(probabilities_frame(row_ids, probabilities), path)


# ============================================================================== command line and main

COMMANDS = ("train", "predict", "score", "prepare")


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def image_size(text):
    value = int(text)
    if value < 32:
        raise argparse.ArgumentTypeError(f"ResNet50 needs at least 32 pixels, got {text}")
    return value


def fraction(text):
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def class_weights(text):
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        values = ()
    if len(values) != len(CLASS_NAMES) or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"needs {len(CLASS_NAMES)} positive numbers like 1,2,4, got {text}")
    return values


def add_common_options(parser):
    """Options that train and predict share."""
    parser.add_argument("--data-dir", default=DATA_DIR, help="folder with train.csv/test.csv and images (default: %(default)s)")
    parser.add_argument("--output-dir", default=OUTPUT_DIR, help="where outputs are written (default: %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=BATCH_SIZE, help="images per step (default: %(default)s)")
    parser.add_argument("--workers", type=positive_int, default=WORKERS, help="threads reading images (default: %(default)s, the CPU count)")


def build_parser(command):
    """The argparse parser for one command; `train` is the default command."""
    program = "script.py" if command == "train" else f"script.py {command}"
    parser = argparse.ArgumentParser(
        prog=program,
        description=__doc__.split("\n\n")[1] if command == "train" else None,
        epilog="Other commands: predict, score, prepare (see `python script.py COMMAND --help`)."
        if command == "train" else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if command == "train":
        add_common_options(parser)
        parser.add_argument("--image-size", type=image_size, default=IMAGE_SIZE, help="pixels, square (default: %(default)s)")
        parser.add_argument("--epochs", type=non_negative_int, default=EPOCHS, help="phase 1 epochs, base frozen (default: %(default)s)")
        parser.add_argument("--fine-tune-epochs", type=non_negative_int, default=FINE_TUNE_EPOCHS,
                            help=f"phase 2 epochs, last {FINE_TUNE_LAYERS} base layers unfrozen; 0 skips it (default: %(default)s)")
        parser.add_argument("--lr", type=float, default=LEARNING_RATE, help="phase 1 learning rate (default: %(default)g)")
        parser.add_argument("--fine-tune-lr", type=float, default=FINE_TUNE_LEARNING_RATE, help="phase 2 learning rate (default: %(default)g)")
        parser.add_argument("--weights", default=WEIGHTS, help="imagenet, none, or a path to ResNet50 notop weights (default: %(default)s)")
        parser.add_argument("--class-weights", type=class_weights, default=CLASS_WEIGHTS,
                            help="loss weight per true class normal_mild,moderate,severe; 1,1,1 turns weighting off (default: 1,2,4, the metric's)")
        parser.add_argument("--val-fraction", type=fraction, default=VAL_FRACTION, help="share held out for validation, whole studies (default: %(default)s)")
        parser.add_argument("--folds", type=positive_int, default=FOLDS,
                            help="K > 1 trains K models on grouped, stratified folds and averages them (default: %(default)s)")
        parser.add_argument("--seed", type=int, default=SEED, help="random seed (default: %(default)s)")
    elif command == "predict":
        add_common_options(parser)
        parser.add_argument("--model", nargs="+", required=True, type=Path,
                            help="saved model(s) (.keras); several are averaged, as a K-fold run's are")
    elif command == "score":
        parser.add_argument("--solution", required=True, type=Path, help="labels: row_id + one-hot columns, or the competition's wide train.csv")
        parser.add_argument("--submission", required=True, type=Path, help="row_id, normal_mild, moderate, severe")
    return parser


def in_notebook():
    """True inside Jupyter/IPython kernels, where sys.argv holds the kernel's own arguments."""
    return "ipykernel" in sys.modules or "__file__" not in globals()


def parse_arguments(argv):
    """(command, options). A bare `python script.py` trains. In a notebook, the kernel's arguments are ignored."""
    command = argv[0] if argv and argv[0] in COMMANDS else "train"
    arguments = argv[1:] if argv and argv[0] in COMMANDS else argv
    parser = build_parser(command)
    if not in_notebook():
        return command, parser.parse_args(arguments)
    options, ignored = parser.parse_known_args(arguments)
    if ignored:
        print(f"(ignoring arguments that are not this script's: {' '.join(ignored)})")
    return command, options


def print_start_summary(data_dir, table, test_table, weights_source):
    """What the run found: data, class mix, device and weights."""
    counts = np.bincount(table["label"], minlength=len(CLASS_NAMES))
    mix = ", ".join(f"{name} {count} ({count / len(table):.0%})" for name, count in zip(CLASS_NAMES, counts))
    devices = ", ".join(sorted({device.device_type for device in tf.config.list_logical_devices()}))
    print(f"data:    {data_dir.resolve()}: {len(table)} training rows ({mix}), {len(test_table)} test rows")
    print(f"device:  {devices}")
    print(f"weights: {weights_source}")


def print_end_summary(artifacts, model_paths, data_dir, seconds):
    """Where everything went, and how to predict again without training."""
    print(f"\nfinished in {seconds:.0f} s. Wrote:")
    for name, path in artifacts.items():
        print(f"  {name:<18}{path}")
    models = " ".join(str(path) for path in model_paths)
    print(f"Predict again without training: python script.py predict --model {models} --data-dir {data_dir}")


def run_config(options, weights_source, constants):
    """config.json: the resolved options, where the weights came from, the priors, and the library versions."""
    return {
        "options": {name: str(value) if isinstance(value, Path) else value for name, value in vars(options).items()},
        "weights_source": weights_source,
        "best_constants": {location: constant.tolist() for location, constant in constants.items()},
        "versions": {
            "python": platform.python_version(), "tensorflow": tf.__version__, "keras": keras.__version__,
            "numpy": np.__version__, "pandas": pd.__version__, "opencv": cv2.__version__,
            "scikit-learn": sklearn.__version__,
        },
    }


def prepare_output_dir(path):
    """Create the output folder and prove it is writable, before any training time is spent."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"--output-dir {path}: is a file, not a folder. Choose a folder.")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise InputError(f"--output-dir {path}: cannot be written ({error.strerror}). Choose a writable folder.") from None
    return path


def train(options):
    """The whole job: validate, train and validate each fold, report, predict the test set, write artifacts."""
    started = time.time()
    data_dir = Path(options.data_dir)
    table = load_train_table(data_dir)
    test_table = load_test_table(data_dir)
    weights, weights_source = resolve_weights(options.weights)
    folds = split_folds(table, options.folds, options.val_fraction, options.seed)
    output_dir = prepare_output_dir(options.output_dir)
    keras.utils.set_random_seed(options.seed)
    print_start_summary(data_dir, table, test_table, weights_source)

    # The prior the model must beat, from all training labels: if anything, this flatters the prior.
    constants = best_constants(labels_frame(table["row_id"], table["label"]))
    histories, validated_rows, oof_parts, test_parts, model_paths = [], [], [], [], []
    test_images = test_table["image_path"].dropna().tolist()
    for fold, (train_rows, validation_rows) in enumerate(folds, start=1):
        print(f"\nfold {fold}/{len(folds)}: {len(train_rows)} training rows, {len(validation_rows)} validation rows")
        checkpoint = output_dir / f".best-fold{fold}.weights.h5"
        model, history = train_fold(table, train_rows, validation_rows, options, weights, checkpoint)
        history.insert(0, "fold", fold)
        histories.append(history)
        model_paths.append(output_dir / ("model.keras" if len(folds) == 1 else f"model_fold{fold}.keras"))
        write_atomically(model_paths[-1], model.save)
        if len(validation_rows):
            validated_rows.append(validation_rows)
            oof_parts.append(predict_probabilities(model, table["image_path"].to_numpy()[validation_rows], options))
        test_parts.append(predict_probabilities(model, test_images, options))
        keras.backend.clear_session()  # Free this fold's model before the next one is built.

    history = pd.concat(histories, ignore_index=True)
    artifacts = {"models": ", ".join(str(path) for path in model_paths)}
    artifacts["history"] = write_csv(history, output_dir / "history.csv")
    if oof_parts:
        rows = np.concatenate(validated_rows)
        row_ids, labels, oof = table["row_id"].to_numpy()[rows], table["label"].to_numpy()[rows], np.concatenate(oof_parts)
        metrics = evaluate(row_ids, labels, oof, constant_predictions(row_ids, constants))
        print_report(metrics)
        artifacts["oof"] = write_csv(probabilities_frame(row_ids, oof), output_dir / "oof.csv")
        artifacts["metrics"] = write_json(metrics, output_dir / "metrics.json")
        artifacts.update(save_plots(history, metrics, output_dir))
    else:
        print("\nno validation rows (--val-fraction 0): the model is the last epoch's and nothing is scored.")

    artifacts["config"] = write_json(run_config(options, weights_source, constants), output_dir / "config.json")
    probabilities = fill_rows_without_image(test_table, np.mean(test_parts, axis=0), constants)
    artifacts["submission"] = write_submission(test_table["row_id"], probabilities, output_dir / "submission.csv")
    print_end_summary(artifacts, model_paths, data_dir, time.time() - started)
    return 0


def load_saved_model(path):
    """A saved .keras model, loaded in safe mode so that a model file cannot run arbitrary code."""
    try:
        return keras.models.load_model(path, safe_mode=True)
    except Exception as error:
        raise InputError(f"--model {path}: not a usable Keras model ({type(error).__name__}: {error}).") from None


def predict(options):
    """Write submission.csv from saved model(s), without training. The image size comes from each model."""
    data_dir = Path(options.data_dir)
    test_table = load_test_table(data_dir)
    constants = {}
    if test_table["image_path"].isna().any():  # Those rows need the training run's priors.
        config_path = options.model[0].parent / "config.json"
        if not config_path.is_file():
            raise InputError(f"test.csv has rows without an image; they need the training run's {config_path}.")
        constants = {key: np.array(value) for key, value in json.loads(config_path.read_text())["best_constants"].items()}
    for path in options.model:
        if not path.is_file():
            raise InputError(f"--model {path}: file not found.")
    output_dir = prepare_output_dir(options.output_dir)
    test_images = test_table["image_path"].dropna().tolist()
    image_probabilities = []
    for path in options.model:  # One model in memory at a time.
        image_probabilities.append(predict_probabilities(load_saved_model(path), test_images, options))
        keras.backend.clear_session()
    probabilities = fill_rows_without_image(test_table, np.mean(image_probabilities, axis=0), constants)
    path = write_submission(test_table["row_id"], probabilities, output_dir / "submission.csv")
    print(f"wrote {path}: {len(test_table)} rows from {len(options.model)} model(s)")
    return 0


def main(argv=None):
    """Run one command. Returns the exit code: 0 done, 2 bad input, 130 interrupted."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command, options = parse_arguments(argv)
    try:
        if command == "train":
            return train(options)
        if command == "predict":
            return predict(options)
        if command == "score":
            run_score(options.solution, options.submission)
            return 0
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    raise AssertionError(f"unhandled command {command}")


if __name__ == "__main__":
    exit_code = main()
    if exit_code and not in_notebook():
        sys.exit(exit_code)
