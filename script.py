"""
RSNA 2024 Lumbar Spine Degenerative Classification, in one file.

Grades lumbar spine degeneration (Normal/Mild, Moderate, Severe) from MRI and writes a Kaggle `submission.csv`: a
level localiser finds each study's 25 condition-levels in its DICOM series, and an ImageNet ResNet50 with the
seed's head grades 2.5D crops cut there. Run it as `python script.py`, or paste it into a notebook cell.

Evidence (2-core CPU, TF 2.21 / Keras 3.15, from random weights, so offline): the shipped sample scores 0.28-0.34
against the best constant's 0.927 in 2.5-3 minutes; five synthetic competitions of 80 + 20 studies: points found to
1.0-1.9 mm, the submission 0.264-0.357, within 0.034 of the same model at the true points (2026-12-05). README: more.

    python script.py                                  # train on ./train.csv, predict ./test.csv
    python script.py --weights none --image-size 64 --epochs 8 --fine-tune-epochs 2 --batch-size 16
                                                      # offline, from scratch, on the sample data
    python script.py --data-dir COMPETITION           # DICOMs: prepare, localiser, severity model, submission
    python script.py predict --model OUT              # a submission from a training run's folder, no training
    python script.py score --solution S.csv --submission P.csv
    python script.py prepare --competition-dir DIR --out-dir OUT   # competition DICOMs → seed layout
    python script.py localise --localiser OUT/localiser.keras --competition-dir DIR --out points.csv

The main path (train): prepare the training crops → train the level localiser → localise the test studies → crop
them → train the severity model → predict → write the submission. The localiser sees whole slices (a stride-4
heatmap per point, presence per slice, the canal's slices set by the anatomy's left-right symmetry, axial slices
matched by world geometry); the severity model streams crops from disk (OpenCV read → augmentation with
cv2.warpAffine → preprocess_input), trains the head with the base frozen, then fine-tunes the last base layers at a
lower rate; from scratch (--weights none) the whole network learns, its residual blocks starting as the identity,
BatchNormalization's statistics recomputed after every epoch.

Contents (each chapter starts with a banner `# == N. name ==`; `grep -n '^# == ' script.py` prints this map):
     1. config                  the defaults a user edits: the run, each model and prepare; each model's settings
     2. task facts              classes, conditions, levels, series kinds, columns, the metric's weights
     3. tables                  reading and checking the CSVs, atomic writes, labels, coordinates, the split
     4. DICOM and geometry      slices, windowing, stacks sorted along their normal, pixel ↔ world, volume cache
     5. crops                   prepare: 2.5D crops around points, one series at a time, into the seed layout
     6. images and augmentation reading crops, ImageDataGenerator-style augmentation with OpenCV
     7. training                shared by both models: weights, devices, precision, resumable progress, callbacks
     8. the level localiser     stage 1: slices, targets, batches, model, losses, fit, decoding the 25 points
     9. the severity model      stage 2: streamed crops, ResNet50 and the seed's head, two phases, prediction
    10. metric and report       the official metric, best constants, the report and its plots, the submission
    11. jobs                    train, predict, prepare, localise and score: from inputs to written outputs
    12. command line            Kaggle discovery, argparse, main
"""

import contextlib
import gc
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # Keep TensorFlow's C++ start-up chatter out of the logs.


@contextlib.contextmanager
def native_stderr_silenced():
    """Send what C++ code writes to file descriptor 2 to /dev/null for a moment, Python's own stderr included.

    TensorFlow's native libraries print their start-up lines (oneDNN, cudart_stub, and on machines without a GPU
    "failed call to cuInit") before absl logging is set up, so TF_CPP_MIN_LOG_LEVEL cannot stop them. The
    descriptor is restored on the way out, before any exception travels on, so a real import error still shows.
    Where there is no descriptor 2 to redirect (some notebook frontends), nothing is changed.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (AttributeError, OSError, ValueError):
        yield
        return
    try:
        silent = os.open(os.devnull, os.O_WRONLY)
        os.dup2(silent, 2)
        os.close(silent)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


import argparse
import concurrent.futures
import functools
import io
import json
import math
import multiprocessing
import platform
import re
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
import weakref
import zipfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


def in_notebook():
    """True inside a Jupyter/IPython shell, where sys.argv holds the kernel's own arguments."""
    ipython = sys.modules.get("IPython")
    return "__file__" not in globals() or (ipython is not None and ipython.get_ipython() is not None)


@contextlib.contextmanager
def collector_paused():
    """Import with Python's cyclic garbage collector paused, then freeze what was imported (gc.freeze), as Python's
    documentation advises for a program that forks workers. Importing NumPy, pandas, TensorFlow and Keras makes
    millions of objects that live as long as the run; the collector, run while they are made, examines them again and
    again, and then at every full collection of the run and at its exit. Frozen, no collection examines them: on 2
    cores TensorFlow and Keras import in 2.8 s instead of 3.4, and a process that imported them ends 0.8 s sooner
    (benchmarks/README.md). In a notebook nothing is frozen (the kernel lives on and may free what is there now)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if not in_notebook():
            gc.freeze()
        if enabled:
            gc.enable()


with collector_paused():
    import cv2
    import numpy as np


@functools.cache
def import_pandas():
    """Import pandas into the script's globals. Run as `python script.py`, main imports it once it has started any
    worker processes that decode DICOMs (start_decoding_workers), which need NumPy, OpenCV and pydicom but not
    pandas: the parent imports pandas while they import pydicom, on two cores at once (prepare --workers 2 on four
    20-study competitions: 1.49-1.66x as fast as one worker before, 1.61-1.71x after; benchmarks/README.md). Imported
    as a module (the tests, the benchmarks) or pasted into a notebook, the script imports pandas at once, below."""
    global pd
    with collector_paused():
        import pandas as pd


if __name__ != "__main__" or in_notebook():
    import_pandas()


@functools.cache
def import_tensorflow():
    """Import TensorFlow, Keras and scikit-learn into the script's globals, then define the script's Keras classes.

    Importing them takes about 3 s on 2 cores, more than a small `prepare`, which needs none of them; so only the
    commands that run a model import them (run_command: train, predict, localise, prepare --localiser), and prepare,
    score and --help start without. Code that calls the script's Keras functions directly (the tests, the benchmarks)
    calls this first. The Keras subclasses stay in their chapters, each chapter's defined by one function called here,
    once their base classes exist; then the devices are found, quietly (initialise_devices).
    """
    global GroupKFold, StratifiedGroupKFold, confusion_matrix, keras, layers, precision_recall_fscore_support
    global sklearn, tf
    # keras imports TensorFlow, whose two native libraries each print the start-up lines.
    with native_stderr_silenced(), collector_paused():
        import keras
        import sklearn
        import tensorflow as tf
        from keras import layers
        from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
        from sklearn.model_selection import GroupKFold, StratifiedGroupKFold
    # By name, so that a script pasted into a notebook twice adds it once.
    if not any(getattr(known, "__name__", "") == "keep_tensorflow_record" for known in tf.get_logger().filters):
        tf.get_logger().addFilter(keep_tensorflow_record)
    define_training_callbacks()
    define_localiser_batches()
    define_localiser_layers()
    define_image_batches()
    initialise_devices()


# OpenCV's own thread pool does not survive fork(): a forked worker (decoding_pool) that inherits it can wait forever
# (opencv/opencv#5150). The images it handles here are small and the script runs them on its own threads, so OpenCV
# runs each call on one thread and never starts that pool.
cv2.setNumThreads(0)


# == 1. config =========================================================================================================

# Plain defaults. Each setting of the run and of the two models is also a command-line option of the same name
# (HEAD_UNITS: --head-units; the learning rates are --lr and --fine-tune-lr), which `python script.py --help` explains;
# the dicts (the augmentations) are edited here only. In a notebook, edit them here, or set sys.argv. A run reads each
# model's block only through that model's settings (below), which it records in config.json and which --resume must
# find unchanged.

DATA_DIR = None  # train.csv, test.csv and images, or the competition's folder. None: ".", or what Kaggle attached.
OUTPUT_DIR = None  # None: ".", or /kaggle/working on Kaggle.
VAL_FRACTION = 0.2  # share of training studies held out for validation
FOLDS = 1  # K > 1: K models on study-grouped folds, out-of-fold predictions, test averaged
SEED = 42  # splits, shuffling, augmentation and initialisation
WORKERS = os.cpu_count() or 1  # processes that decode DICOMs, threads that read and augment images
STRATEGY = "auto"  # one of STRATEGIES: how training spreads over devices
PRECISION = "auto"  # one of PRECISIONS
# The severity model grades each crop and its mirror image and averages the two (it learns on mirrored crops too:
# AUGMENTATION's horizontal_flip). Four phantom runs: what a point 1-2 mm off costs fell (benchmarks/README.md).
PREDICT_MIRRORED = True

# The severity model: ResNet50 and the seed's head, on one crop per condition and level.
IMAGE_SIZE = 224  # px, square
BATCH_SIZE = 32  # images per step on each device
EPOCHS = 5  # phase 1: pretrained, only the head learns; from scratch, everything does
FINE_TUNE_EPOCHS = 3  # phase 2; 0 skips it
LEARNING_RATE = 1e-3  # Adam, phase 1
FINAL_LEARNING_RATE = 0.1  # each phase: warmed up over its first epoch, then cosine-decayed to this share of its rate
FINE_TUNE_LEARNING_RATE = 1e-5  # Adam, phase 2: small, so pretrained features are nudged, not destroyed
FINE_TUNE_LAYERS = 10  # base layers that learn in phase 2 when pretrained (BatchNormalization stays frozen)
WEIGHTS = "imagenet"  # imagenet | none | a path to ResNet50 notop weights
CLASS_WEIGHTS = (1.0, 2.0, 4.0)  # loss weight per true class: as the metric's LABEL_WEIGHTS, so training aims at it
BATCH_NORMALIZATION_IMAGES = 512  # unaugmented training images that set BatchNormalization's statistics each epoch
HEAD_UNITS = 128  # the seed's head: Flatten → Dense(HEAD_UNITS) → Dropout(HEAD_DROPOUT) → Dense(3, softmax)
HEAD_DROPOUT = 0.5
# The seed's ImageDataGenerator augmentation, for training batches only (AUGMENTATION_KEYS lists what is honoured).
# A crop is centred on its labelled level, so shifts and turns stay small: the seed's 0.2 shift moved the centre
# ~10 mm of a 48 mm crop, a third of the way to the next level, and with its 20° turns the sample's validation
# weighted log loss was 0.65 after 8 epochs from scratch, against 0.29 with these (the constant: 1.08).
# shear_range is in degrees in ImageDataGenerator, so 0.2 is a very light shear; kept for fidelity.
AUGMENTATION = dict(
    rotation_range=10,
    width_shift_range=0.1,
    height_shift_range=0.1,
    shear_range=0.2,
    zoom_range=0.2,
    horizontal_flip=True,
    fill_mode="nearest",
)


# Half a row of each class is added to every location's counts before its best constant is taken, so that a class
# a small training set lacks gets a small probability rather than 0 (clipped to 1e-15 by the metric, one such row
# would cost about 34.5). On the real labels (about 1,900 rows per location) it moves no score by more than 0.001.
CONSTANT_SMOOTHING_ROWS = 0.5

# The level localiser (stage 1): ResNet50 with a stride-4 heatmap head, on whole slices. It finds the 25 points of a
# study that has no label coordinates (the hidden test set), so crops can be cut there.
LOCALISER_IMAGE_SIZE = 128  # px, square: a 288-320 px sagittal slice at 2.3-2.5 px per input px; heatmap stride 4
LOCALISER_EPOCHS = 30  # each epoch: LOCALISER_SLICES_PER_STUDY slices per study and series kind (0: no localiser)
LOCALISER_SLICES_PER_STUDY = 2  # per series kind and epoch
# More slices per study where there are few studies, so the localiser gets enough steps to learn: with one series kind,
# 19 real-MR training studies give 38 slices an epoch; at least 192 took within 10 mm from 73-93 % to 97 % on two folds,
# and 384 over all 30 studies: median 4.1 -> 3.4 mm, within 10 mm 91 -> 95 %, levels on a wrong disc 2 -> 1
# (benchmarks/REAL_MR.md). The 80-study phantoms (177 study-kinds) now draw 3 a study-kind, 531 slices, not 354.
LOCALISER_MIN_SLICES_PER_EPOCH = 384
LOCALISER_LABELLED_SHARE = 0.5  # of those, drawn at or next to a labelled slice; the rest anywhere in the stack
LOCALISER_BATCH_SIZE = 8  # slices per step
LOCALISER_LEARNING_RATE = 1e-3  # Adam; warmed up over the first epoch, then cosine-decayed
LOCALISER_FINAL_LEARNING_RATE = 0.1  # the cosine decay's end, as a share of LOCALISER_LEARNING_RATE
# The localiser keeps the mean of its weights over this share of its last epochs (rounded up, at least the last one;
# then BatchNormalization is recalibrated). 0.25 (the last 8 of 30), tried on real MR: subject 2's count mended, but
# subject 29's lost in one build and within one slice 91.2 -> 90.2 % on the builds not tuned on; phantom seed 5's cost
# of localisation 0.034 -> 0.018. Not the default (docs/experiments.md).
LOCALISER_AVERAGED_SHARE = 0.0
LOCALISER_AUGMENTATION = dict(rotation_range=10, width_shift_range=0.08, height_shift_range=0.08, zoom_range=0.1)
# What scanners and sequences change, drawn for LOCALISER_INTENSITY_SHARE of the training slices: a gamma (log-uniform
# in the range), a contrast factor about the mean, a smooth multiplicative bias field (its log's standard deviation), a
# Gaussian blur (sigma up to this many input px) and Gaussian noise (standard deviation up to this share of full
# scale). On every slice: on real MR (5 folds of 30 volumes) within 10 mm about 94 % against 80 % without it (fold
# 1), and far less lost on another contrast; on the phantoms, whose contrast never changes, localisation costs the
# severity score 0.041 / -0.036 / 0.097 on seeds 11 / 37 / 23 against 0.027 / 0.024 / 0.059 (docs/localiser.md).
LOCALISER_INTENSITY_AUGMENTATION = dict(gamma=(0.6, 1.6), contrast=(0.7, 1.4), bias_field=0.3, blur=1.0, noise=0.04)
LOCALISER_INTENSITY_SHARE = 1.0
LOCALISER_WIDTH = 128  # channels of the head's feature pyramid
# A point's coordinates weigh this much more than its presence in the localiser's loss: an L1 error of 0.01
# (2 input pixels) should count about as much as a presence guess that is wrong by a fair margin.
LOCALISER_COORDINATE_LOSS_WEIGHT = 20.0
LOCALISER_HEATMAP_SIGMA_CELLS = 1.0  # heatmap cells (stride 4): the Gaussian around a labelled point, the map's target
LOCALISER_PEAK_WINDOW = 2  # heatmap cells (stride 4, so ±8 input px) around the peak that a found point averages over
AXIAL_MATCH_MM = 5.0  # mm: an axial slice farther than this from a level's point is no match for it
# The five levels of the canal (and of each side's foramina) are decoded as one chain: each level chooses among this
# many places on its slice, jointly with the others, so that every step from one level down to the next is one the
# labels would draw: its length within this range of the mean step's, its direction within this angle of the mean's.
# Real spines' steps lie within 0.87-1.13 of the mean (30 subjects), found chains on their discs within 0.78-1.20; a
# chain squeezed up one disc at its top has one step 1.37-1.49 of it (benchmarks/REAL_MR.md), which 1.5 let through.
CHAIN_CANDIDATES = 6
CHAIN_STEP_RANGE = (0.7, 1.3)
# Where the training labels' chains vary more, the range widens to hold 99 % of them (each study's shortest and longest
# step, their 0.5th and 99.5th percentiles: learn_step_ranges), but never beyond these limits, which still refuse two
# levels on one disc and a skipped disc (a step near 2). The real competition's own labels have a step outside 0.7-1.3
# of their study's mean in 1.5 % of studies (degenerate discs, slips); the 30 real volunteers and the phantoms stay
# within 0.80-1.21, so there the range is CHAIN_STEP_RANGE (benchmarks/REAL_MR.md).
CHAIN_STEP_RANGE_LIMITS = (0.5, 1.6)
CHAIN_STEP_ANGLE = 40.0  # degrees
CHAIN_MIN_SD_MM = 3.0  # mm: the least standard deviation recorded for a step, per axis
# Choosing a condition's slices jointly, each step across the stack is weighed by a Gaussian this many times wider than
# the labels' own scatter of it: the slices the presence picks scatter too. Real MR, two sets of five fold localisers:
# slice within one 88 / 88 % at 1, 90 / 90 % at 2, 91 / 91 % at 2.5 and 3 (benchmarks/REAL_MR.md).
CHAIN_SLICE_SD_FACTOR = 2.5
# Then each canal level moves to the slice nearest the spine's plane of left-right symmetry at that level, where the
# anatomy says so clearly (symmetric_slices): the patch this far each way around the level's point, compared between
# slices at equal distances either side of a centre out to SYMMETRY_REACH_MM (a vertebral body is ~40 mm wide), among
# slices where the level is present at least SYMMETRY_PRESENCE_FLOOR of its peak; it moves only if the mean correlation
# there beats that about the presence's own pick by SYMMETRY_MARGIN. Real MR, builds not tuned on: slice within one
# 86.5 -> 90.5 % (benchmarks/REAL_MR.md).
SYMMETRY_HALF_WIDTH_MM = 15.0
SYMMETRY_REACH_MM = 16.0
SYMMETRY_PRESENCE_FLOOR = 0.1
SYMMETRY_MARGIN = 0.05
# Where the chosen slices hold no chain, a level whose presence (smoothed) stays under this on every slice is one the
# presence does not see: its place in the chain may be on any of its slices (chain_places). Real MR (two sets of fold
# localisers, 30 studies each): the scoliosis's L1/L2-L4/L5 peak at 0.01-0.08; of the other 290 levels, one at 0.09,
# the rest at 0.11 or more.
CHAIN_UNSEEN_PRESENCE = 0.1
# Where the chain moves a level off its own heatmap's peak, neither is sure: the level's crops then carry
# min(1, p(place) / p(peak) / CHAIN_TRUST_RATIO) of its prediction, and its best constant the rest (row_probabilities).
CHAIN_TRUST_RATIO = 0.6
# A found point's severity is the mean over its slice and the slices beside it, weighted by presence ** this power:
# where the localiser cannot tell two slices apart, the prediction hedges between them rather than betting on one.
SLICE_MIX_POWER = 4
SLICE_MIX_MINIMUM = 0.05  # a neighbour weighted less than this is not cropped at all

# prepare: crops cut from the competition DICOMs.
# 48 mm covers one disc level with context: the disc (about 10 mm tall) plus roughly half of the
# vertebral bodies above and below it on sagittal slices, and on axial slices the whole spinal
# canal (15-25 mm wide) with both subarticular recesses and the facet joints.
PREPARE_CROP_MM = 48.0
# 128 pixels over 48 mm is 0.375 mm per pixel, about the finest in-plane spacing of lumbar MRI
# (typically 0.3-0.8 mm), so no detail is lost, while ~49,000 three-channel crops take about
# 1 GB of PNG files (15-20 KiB each).
PREPARE_CROP_PIXELS = 128
# Percentiles that set each series' 8-bit window: robust to the few very bright fat or fluid
# pixels and to the empty background, unlike the raw minimum and maximum.
WINDOW_PERCENTILES = (1.0, 99.5)


# A crop of which less than this share lies on its slice is skipped (its row counted, never trained on): its point
# is outside the slice, or so near an edge that the crop would be mostly black padding.
MINIMUM_CROP_INSIDE = 0.5

STRATEGIES = {
    "auto": "several GPUs → mirrored, a TF_CONFIG cluster → multiworker, else default",
    "default": "one device",
    "mirrored": "every GPU of this machine (without GPUs, every CPU device)",
    "multiworker": "the machines that TF_CONFIG names",
    "tpu": "refused: OpenCV input cannot feed a TPU",
}
PRECISIONS = {
    "auto": "mixed_float16 on GPUs with tensor cores (compute capability 7.0+), else float32",
    "float32": "float32 everywhere",
    "mixed": "mixed precision anywhere (mixed_bfloat16 without a GPU)",
}


@dataclass(frozen=True)
class SeveritySettings:
    """The severity model's settings, from the command line and the block above (severity_settings(options)). Each
    field is named as its option's destination (--fine-tune-lr: fine_tune_lr; --head-units: head_units), or as its
    config-block name in lower case where it has no option (AUGMENTATION: augmentation)."""

    image_size: int
    batch_size: int
    epochs: int
    fine_tune_epochs: int
    lr: float
    fine_tune_lr: float
    fine_tune_layers: int
    weights: str
    class_weights: tuple
    batch_normalization_images: int
    head_units: int
    head_dropout: float
    augmentation: dict
    final_learning_rate: float

    def recorded(self):
        """The settings as config.json and the resume check record them."""
        return {name: list(value) if isinstance(value, tuple) else value for name, value in asdict(self).items()}


def severity_settings(options):
    """The severity model's settings for a run: its options, and the config block for the augmentation."""
    check_augmentation(AUGMENTATION, "AUGMENTATION")
    return settings_from(
        SeveritySettings, options, class_weights=tuple(options.class_weights), augmentation=dict(AUGMENTATION)
    )


@dataclass(frozen=True)
class LocaliserSettings:
    """The level localiser's settings, named as the severity model's are (localiser_settings(options)); it shares
    --weights with the severity model."""

    localiser_image_size: int
    localiser_epochs: int
    localiser_slices_per_study: int
    localiser_min_slices_per_epoch: int
    localiser_labelled_share: float
    localiser_batch_size: int
    localiser_learning_rate: float
    localiser_final_learning_rate: float
    localiser_averaged_share: float
    localiser_augmentation: dict
    localiser_intensity_augmentation: dict
    localiser_intensity_share: float
    localiser_width: int
    localiser_coordinate_loss_weight: float
    localiser_heatmap_sigma_cells: float
    localiser_peak_window: int
    weights: str

    def recorded(self):
        return asdict(self)


def localiser_settings(options):
    """The localiser's settings for a run: its options, and its config block for the augmentations."""
    check_augmentation(LOCALISER_AUGMENTATION, "LOCALISER_AUGMENTATION")
    return settings_from(
        LocaliserSettings,
        options,
        localiser_augmentation=dict(LOCALISER_AUGMENTATION),
        localiser_intensity_augmentation=dict(LOCALISER_INTENSITY_AUGMENTATION),
    )


def settings_from(kind, options, **given):
    """A settings dataclass of `kind`: each field the option of its name (its destination), unless `given`."""
    return kind(
        **{each.name: given[each.name] if each.name in given else getattr(options, each.name) for each in fields(kind)}
    )


# == 2. task facts =====================================================================================================

# Facts about the task. Each is defined once; everything else derives from these.
CLASS_NAMES = ("normal_mild", "moderate", "severe")  # Label and submission columns, in order.
SEVERITY_NAMES = ("Normal/Mild", "Moderate", "Severe")  # The competition's spelling of the same classes.
LABEL_WEIGHTS = (1.0, 2.0, 4.0)  # The competition metric's weight for each true class.
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
TRAIN_COLUMNS = ("row_id", "image_path", *CLASS_NAMES)
TEST_COLUMNS = ("row_id", "image_path")


COORDINATE_COLUMNS = ["study_id", "series_id", "instance_number", "condition", "level", "x", "y"]
# Optional in test.csv and in coordinates: a row_id listed once per crop (or slice) with this column is predicted as
# the weighted mean of its crops' predictions.
CROP_WEIGHT = "crop_weight"
CROP_WEIGHT_DECIMALS = 4  # A crop weight is written with this many decimals, and is never less than one unit of them.
SUBMISSION_COLUMNS = ("row_id", *CLASS_NAMES)
WIDE_LABEL_COLUMNS = tuple(f"{condition}_{level}" for condition in CONDITIONS for level in LEVELS)
PROBABILITY_EPSILON = 1e-15  # The official metric clips probabilities to [epsilon, 1 - epsilon].
# The series kinds the localiser reads, by the competition's series_description.
SERIES_KINDS = {"Sagittal T2/STIR": "canal", "Sagittal T1": "foramen", "Axial T2": "recess"}
# Condition groups and the series each is labelled on, as in the competition.
CONDITION_KIND = {
    "spinal_canal_stenosis": "canal",
    "left_neural_foraminal_narrowing": "foramen",
    "right_neural_foraminal_narrowing": "foramen",
    "left_subarticular_stenosis": "recess",
    "right_subarticular_stenosis": "recess",
}
# The least probability the model's predictions (oof.csv, submission.csv) give any class. A float32 softmax can
# round a class to exactly 0, which the metric clips to 1e-15: one such row of that class would cost about 34.5. At
# this floor it costs at most 9.2, while a confident right answer loses at most 0.0002.
PREDICTION_FLOOR = 1e-4
KAGGLE_ROOT = Path(os.environ.get("KAGGLE_ROOT", "/kaggle"))  # Kaggle's folders; tests point this elsewhere.


class InputError(ValueError):
    """Bad user input: reported as one clear message and exit code 2, never a traceback."""


# == 3. tables =========================================================================================================


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
    refuse_unreadable_file(path)
    try:
        # index_col=False: a trailing comma on every data row must not turn row_id into the index.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", pd.errors.ParserWarning)  # pandas' note that it dropped that comma.
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig", index_col=False)
        # pandas renames a repeated header ("severe", "severe.1"), so the names are read again as written.
        header = pd.read_csv(path, header=None, nrows=1, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as error:
        raise InputError(f"{path}: cannot be read as a UTF-8 CSV ({error}).") from None
    names = [str(name).strip() for name in header.iloc[0]]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise InputError(f"{path}: column(s) {', '.join(repeated)} appear more than once. Keep one of each.")
    frame.columns = names
    if frame.empty:  # Every reader needs rows; without any, later steps would fail far from the cause.
        raise InputError(f"{path}: has a header but no rows. Check that it is the right file, or fill it in.")
    return frame


def refuse_unreadable_file(path, what="file", option=""):
    """Refuse a path that is missing, a folder, or not a regular file (/dev/null, a pipe), saying which.

    option names the command-line option the path came from, for the message ("--model ")."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{option}{path}: is a folder, not a {what}. Give the path of the {what} itself.")
    if not path.exists():
        raise InputError(f"{option}{path}: file not found. Check the folder given on the command line.")
    if not path.is_file():
        raise InputError(
            f"{option}{path}: is not a regular file (a device, pipe or socket). Give the path of a {what}."
        )


def require_columns(path, frame, columns):
    """Refuse a table that lacks any of `columns`, naming them."""
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise InputError(
            f"{path}: missing column(s) {', '.join(missing)}. Expected: {', '.join(columns)}; "
            f"found: {', '.join(frame.columns)}."
        )


def refuse_duplicate_row_ids(path, frame, repeats_allowed=False):
    """Every row_id must be present and unique: submissions and labels are keyed by it."""
    empty = frame.index[frame["row_id"].str.strip() == ""]
    if len(empty):
        raise InputError(f"{path}: empty row_id on line(s) {list_some(empty + 2)}. Give every row an id.")
    if repeats_allowed:
        return
    duplicated = frame["row_id"][frame["row_id"].duplicated()].unique()
    if len(duplicated):
        raise InputError(f"{path}: duplicate row_id(s) {list_some(duplicated)}. Each row_id must be unique.")


def read_table(path, columns):
    """A CSV with the given columns and unique row_ids."""
    frame = read_csv(path)
    require_columns(path, frame, columns)
    refuse_duplicate_row_ids(path, frame)
    return frame


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
    """A table as CSV, atomically; returns the path."""
    write_atomically(path, lambda temporary: frame.to_csv(temporary, index=False))
    return path


def write_json(data, path):
    """Data as indented JSON, atomically; returns the path."""
    write_atomically(path, lambda temporary: temporary.write_text(json.dumps(data, indent=2) + "\n"))
    return path


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
    """Image paths are relative to the data folder, or absolute. An empty path stays None.

    Spaces around a path are dropped: a CSV written with ", " between its cells would otherwise make every image
    "missing" for the space before its path."""
    return [str(data_dir / path.strip()) if path.strip() else None for path in frame["image_path"]]


def image_problem(image_path):
    """Why an image cannot be used ("missing", "not a readable image"), or None. Cheap: reads the header only."""
    if image_path is None:  # No image on purpose (test rows only).
        return None
    if os.path.isdir(image_path):
        return "is a folder, not an image"
    if not os.path.isfile(image_path):
        return "missing" if not os.path.exists(image_path) else "not a regular file"
    if os.path.getsize(image_path) == 0 or not cv2.haveImageReader(image_path):
        return "not a readable image"
    return None


def check_images(path, frame, image_paths, skip_bad_images=False):
    """Check every image up front. Bad ones are refused, naming them, or with skip_bad_images dropped and counted.

    Returns the mask of rows to keep.
    """
    problems = pd.Series([image_problem(image_path) for image_path in image_paths], dtype=object)
    bad = problems.notna().to_numpy()
    if not bad.any():
        return ~bad
    described = [
        f"{row_id} ({image_path}: {problem})"
        for row_id, image_path, problem in zip(frame["row_id"][bad], np.array(image_paths, object)[bad], problems[bad])
    ]
    if skip_bad_images:
        print(
            f"{path.name}: --skip-bad-images: dropped {int(bad.sum())} row(s) whose image cannot be used: "
            + list_some(described)
        )
        return ~bad
    raise InputError(
        f"{path}: {int(bad.sum())} image(s) cannot be used: {list_some(described)}. "
        "Restore the files or fix the image_path column (or pass --skip-bad-images for training rows)."
    )


def load_train_table(data_dir, skip_bad_images=False):
    """train.csv with validated one-hot labels and images; rows whose labels are all blank are dropped."""
    path = data_dir / "train.csv"
    frame = read_table(path, TRAIN_COLUMNS)
    labels = parse_labels(path, frame)
    labelled = ~np.isnan(labels).any(axis=1)
    if not labelled.all():
        print(f"train.csv: dropped {int((~labelled).sum())} row(s) whose labels are all blank.")
    frame, labels = frame[labelled].reset_index(drop=True), labels[labelled]
    groups = condition_groups(frame["row_id"]).to_numpy()
    if (groups == "").any() and (groups != "").any():  # Refused now, not after hours of training, at scoring.
        raise InputError(
            f"{path}: row_id(s) {list_some(frame['row_id'][groups == ''])} name none of the conditions "
            "while the others do; the metric cannot score such a mix. Use one kind of row_id throughout."
        )
    no_image = frame["row_id"][frame["image_path"].str.strip() == ""]
    if len(no_image):
        raise InputError(f"{path}: empty image_path for row_id {list_some(no_image)}. Training rows need an image.")
    image_paths = resolve_image_paths(data_dir, frame)
    keep = check_images(path, frame, image_paths, skip_bad_images)
    if not keep.any():
        raise InputError(f"{path}: no usable labelled rows. Each row needs a one-hot label and an image.")
    table = pd.DataFrame({"row_id": frame["row_id"], "image_path": image_paths, "label": labels.argmax(axis=1)})
    return table[keep].reset_index(drop=True)


def load_test_table(data_dir):
    """test.csv with validated images; every row is kept, since a submission must be complete.

    An empty image_path means "no image" on purpose: that row gets its location's best constant. With a CROP_WEIGHT
    column, a row_id may be listed once for each of several crops (prepare writes this where a found point's
    slice is uncertain); its prediction is their weighted mean.
    """
    path = data_dir / "test.csv"
    frame = read_csv(path)
    require_columns(path, frame, TEST_COLUMNS)
    weighted = CROP_WEIGHT in frame.columns
    refuse_duplicate_row_ids(path, frame, repeats_allowed=weighted)
    if frame.empty:
        raise InputError(f"{path}: no rows. List the row_ids to predict.")
    image_paths = resolve_image_paths(data_dir, frame)
    check_images(path, frame, image_paths)
    table = pd.DataFrame({"row_id": frame["row_id"], "image_path": image_paths})
    if weighted:
        table[CROP_WEIGHT] = positive_weights(path, frame[CROP_WEIGHT])
    return table


def study_ids(row_ids):
    """The study of each row_id: the digits before the first "_" of `{study_id}_...` ids, else the row itself.

    For competition row_ids this is the official metric's study; other ids are each their own study.
    """
    row_ids = pd.Series(row_ids, dtype=str)
    return row_ids.str.extract(STUDY_PATTERN, expand=False).fillna(row_ids)


def locations(row_ids):
    """The location "{condition}_{level}" that each competition row_id names; NaN for any other row_id."""
    after_study = pd.Series(row_ids, dtype=str).str.extract(r"^\d+_(.+)$", expand=False)
    return after_study.where(after_study.isin(WIDE_LABEL_COLUMNS))


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

    With one fold, the holdout is one fold of round(1 / val_fraction), so the share is close to val_fraction;
    with fewer studies than that, it is one study, so that any two studies can still be validated.
    """
    if folds == 1 and val_fraction == 0:
        return [(np.arange(len(table)), np.arange(0))]
    groups = study_ids(table["row_id"]).to_numpy()
    studies = len(set(groups))
    if folds > 1 and studies < folds:
        raise InputError(
            f"train.csv: {studies} studies cannot be split into {folds} folds (--folds {folds}); "
            f"each fold needs a study of its own. Use --folds {studies} or fewer."
        )
    if studies < 2:
        raise InputError(
            f"train.csv: every row comes from one study, so no whole study can be held out for "
            f"validation (--val-fraction {val_fraction:g}). Add studies, or pass --val-fraction 0 "
            "to train on everything without validation."
        )
    splits = folds if folds > 1 else min(max(2, round(1 / val_fraction)), studies)
    rows = np.zeros(len(table))
    try:
        with warnings.catch_warnings():  # Classes rarer than the folds are fine: they simply miss some folds.
            warnings.filterwarnings("ignore", "The least populated class", UserWarning)
            splitter = StratifiedGroupKFold(n_splits=splits, shuffle=True, random_state=seed)
            pairs = list(splitter.split(rows, table["label"], groups))
    except ValueError:  # Every class has fewer rows than there are folds: too few to stratify by.
        pairs = []
    if not pairs or min(len(validation) for _, validation in pairs) == 0:
        # Without enough rows to stratify, folds of about equal size, studies shuffled by the seed.
        shuffled = pd.Series(groups).map(
            dict(zip(sorted(set(groups)), np.random.default_rng(seed).permutation(studies)))
        )
        pairs = list(GroupKFold(n_splits=splits).split(rows, groups=shuffled))
    return pairs if folds > 1 else pairs[:1]


def read_competition_csv(path, columns):
    """A competition CSV, every cell as text, that has the given columns."""
    frame = read_csv(path)
    require_columns(path, frame, columns)
    return frame


def snake_case(names):
    """Turn 'Spinal Canal Stenosis' or 'L1/L2' into 'spinal_canal_stenosis' or 'l1_l2'."""
    return names.str.strip().str.lower().str.replace(r"[\s/]+", "_", regex=True)


def read_coordinates(path):
    """Label coordinates as row_id, study_id, series_id, instance_number, x and y; one point per row_id.

    Accepts the competition's spelling of condition and level as well as snake_case. With a CROP_WEIGHT column (as
    the localiser writes for the test studies), a row_id may have a point on several slices, each weighted.
    """
    coordinates = read_competition_csv(path, COORDINATE_COLUMNS)
    weighted = CROP_WEIGHT in coordinates.columns
    condition, level = snake_case(coordinates["condition"]), snake_case(coordinates["level"])
    for names, known, column in ((condition, CONDITIONS, "condition"), (level, LEVELS, "level")):
        unknown = sorted(set(names) - set(known))
        if unknown:
            raise InputError(f"{path}: unknown {column} {list_some(unknown, limit=5)}. Expected: {', '.join(known)}.")
    try:
        numbers = coordinates[["instance_number", "x", "y"]].apply(pd.to_numeric)
    except ValueError as error:
        raise InputError(f"{path}: instance_number, x and y must be numbers ({error}).") from None
    not_finite = ~np.isfinite(numbers.to_numpy(dtype=float)).all(axis=1)
    if not_finite.any():  # A blank cell reads as NaN, which would crop nothing and crash the instance lookup.
        raise InputError(
            f"{path}: instance_number, x and y must be finite numbers; blank or infinite on line(s) "
            f"{list_some(coordinates.index[not_finite] + 2)}."
        )
    fractional = numbers["instance_number"] % 1 != 0
    if fractional.any():  # Files are named by whole instance numbers; 3.5 must not quietly become 3.
        raise InputError(
            f"{path}: instance_number must be a whole number; it is not on line(s) "
            f"{list_some(coordinates.index[fractional] + 2)}."
        )
    blank_ids = (coordinates[["study_id", "series_id"]].apply(lambda column: column.str.strip()) == "").any(axis=1)
    if blank_ids.any():  # A blank series_id would point at the study's folder instead of a series.
        raise InputError(
            f"{path}: blank study_id or series_id on line(s) {list_some(coordinates.index[blank_ids] + 2)}."
        )
    study_id, series_id = coordinates["study_id"].str.strip(), coordinates["series_id"].str.strip()
    weights = positive_weights(path, coordinates[CROP_WEIGHT]) if weighted else None
    coordinates = pd.DataFrame(
        {
            "row_id": study_id + "_" + condition + "_" + level,
            "study_id": study_id,
            "series_id": series_id,
            "instance_number": numbers["instance_number"].astype(int),
            "x": numbers["x"].astype(float),
            "y": numbers["y"].astype(float),
        }
    )
    coordinates = coordinates.sort_values(["row_id", "series_id", "instance_number", "x", "y"])
    if weighted:
        coordinates[CROP_WEIGHT] = weights
        return coordinates.drop_duplicates(["row_id", "series_id", "instance_number"]).reset_index(drop=True)
    # Some (study, condition, level) triples have several points. Keep the first by series id,
    # instance number and position, so the pick does not depend on the file's row order.
    return coordinates.drop_duplicates("row_id").reset_index(drop=True)


def positive_weights(path, column):
    """A CROP_WEIGHT column as floats, refused unless every one is a finite number > 0."""
    weights = pd.to_numeric(column.str.strip(), errors="coerce")
    bad = ~(np.isfinite(weights) & (weights > 0))
    if bad.any():
        raise InputError(
            f"{path}: {CROP_WEIGHT} must be a number > 0; it is not on line(s) {list_some(column.index[bad] + 2)}."
        )
    return weights.astype(float)


def read_labels(path):
    """The competition's train.csv as row_id plus one-hot CLASS_NAMES columns, NaN for blank labels."""
    frame = read_competition_csv(path, ["study_id", *WIDE_LABEL_COLUMNS])
    study_id = frame["study_id"].str.strip()
    if (study_id == "").any() or study_id.duplicated().any():  # Refused here, not as the prepared train.csv's rows.
        bad = sorted(set(study_id[study_id.duplicated()])) or ["(blank)"]
        raise InputError(
            f"{path}: each study_id must be given once and not blank; repeated or blank: {list_some(bad)}."
        )
    return labels_from_wide(frame)


def labelled_rows(labels, coordinates):
    """Join labels with coordinates: the rows to crop, and how many were skipped and why.

    Returns (rows, skipped): rows has row_id, the coordinate columns and integer one-hot
    CLASS_NAMES columns; skipped counts blank labels and labels without a coordinate.
    """
    rows = labels.merge(coordinates, on="row_id", how="left")
    blank = rows[list(CLASS_NAMES)].isna().any(axis=1)
    without_coordinate = ~blank & rows["series_id"].isna()
    rows = rows[~blank & ~without_coordinate].astype({name: int for name in CLASS_NAMES})
    skipped = {"blank_label": int(blank.sum()), "without_coordinate": int(without_coordinate.sum())}
    return rows.reset_index(drop=True), skipped


def submission_rows(series_descriptions, coordinates=None):
    """All 25 row_ids of every study in a series_descriptions table, with a coordinate where one is given."""
    studies = pd.Series(series_descriptions["study_id"].str.strip().unique(), name="study_id")
    rows = pd.merge(studies, pd.Series(WIDE_LABEL_COLUMNS, name="label"), how="cross")
    rows = pd.DataFrame({"row_id": rows["study_id"] + "_" + rows["label"]})
    if coordinates is None:
        coordinates = pd.DataFrame(columns=["row_id", "study_id", "series_id", "instance_number", "x", "y"])
    return rows.merge(coordinates, on="row_id", how="left")


def read_split_rows(competition_dir, split, coordinates):
    """The rows of one split and the counts of rows without a label or coordinate."""
    if split == "train":
        labels = read_labels(competition_dir / "train.csv")
        coordinates = read_coordinates(coordinates or competition_dir / "train_label_coordinates.csv")
        if CROP_WEIGHT in coordinates:  # A label is trained on one crop: its most weighted slice.
            coordinates = coordinates.sort_values(CROP_WEIGHT, ascending=False, kind="stable").drop_duplicates("row_id")
            coordinates = coordinates.drop(columns=CROP_WEIGHT)
        return labelled_rows(labels, coordinates)
    if split == "test":
        series_descriptions = read_competition_csv(competition_dir / "test_series_descriptions.csv", ["study_id"])
        rows = submission_rows(series_descriptions, read_coordinates(coordinates) if coordinates else None)
        return rows, {"without_coordinate": int(rows["series_id"].isna().sum())}
    raise InputError(f"split must be 'train' or 'test', not {split!r}")


def read_series_descriptions(competition_dir, split):
    """A split's series descriptions, checked for the columns the localiser needs."""
    return read_competition_csv(
        competition_dir / f"{split}_series_descriptions.csv", ["study_id", "series_id", "series_description"]
    )


def study_series(series_descriptions):
    """{study_id: {kind: [series_id, ...]}} from a series_descriptions table (unknown descriptions are ignored)."""
    found = {}
    for study_id, series_id, description in series_descriptions[
        ["study_id", "series_id", "series_description"]
    ].itertuples(index=False):
        kind = SERIES_KINDS.get(description.strip())
        if kind:
            found.setdefault(study_id.strip(), {}).setdefault(kind, []).append(series_id.strip())
    return found


# == 4. DICOM and geometry =============================================================================================


def load_pydicom():
    """Import pydicom on first use (collector_paused), so the rest of the script runs without it."""
    first = "pydicom" not in sys.modules
    try:
        with collector_paused() if first else contextlib.nullcontext():
            import pydicom
    except ImportError as error:
        raise InputError("reading DICOM files needs pydicom: pip install pydicom") from error
    return pydicom


def read_slice(path, without_spacing=None):
    """Read one DICOM slice as (float32 pixels with bright meaning dense, row spacing, column spacing).

    A slice without PixelSpacing is taken as 1 mm per pixel; its path is appended to the list without_spacing, when
    one is given, so that the summary can name its series."""
    dataset = load_pydicom().dcmread(path, force=True)  # Also files written without the 128-byte preamble.
    return slice_pixels(dataset, path, without_spacing)


def slice_pixels(dataset, path, without_spacing=None):
    """read_slice's result from a file already read (its dataset)."""
    pydicom = load_pydicom()
    # Rescale slope and intercept may differ between slices of one series, so apply them before
    # windowing the series as a whole.
    pixels = pydicom.pixels.apply_modality_lut(dataset.pixel_array, dataset).astype(np.float32)
    # MONOCHROME1 stores bright as low values; negating gives MONOCHROME2's order, and the
    # window below maps either range to 0..255.
    if dataset.get("PhotometricInterpretation") == "MONOCHROME1":
        pixels = -pixels
    # A slice without PixelSpacing is taken as 1 mm per pixel rather than lost, and reported.
    if not dataset.get("PixelSpacing") and without_spacing is not None:
        without_spacing.append(path)
    row_spacing, column_spacing = (float(spacing) for spacing in dataset.get("PixelSpacing") or (1.0, 1.0))
    return pixels, row_spacing, column_spacing


def decoding_cause(error):
    """One line saying why a DICOM file could not be decoded, worded alike for every file with the same cause.

    pydicom explains a missing decoder in four lines per file (one per plugin it tried); this keeps the transfer
    syntax, what would decode it and how to install that."""
    text = str(error).strip()
    missing = re.match(r"Unable to decompress '(.+?)' pixel data because all plugins are missing dependencies", text)
    if missing:
        needs = [line.split(" - requires ", 1)[-1].strip() for line in text.splitlines()[1:] if " - requires " in line]
        return (
            f"no decoder installed for {missing.group(1)} (it needs one of: {' | '.join(needs)}; for example "
            "pip install pylibjpeg-libjpeg (GPLv3), or pip install python-gdcm)"
        )
    return f"{type(error).__name__}: {text.splitlines()[0] if text else 'cannot be decoded'}"


def intensity_window(slices):
    """The (low, high) intensities that one series' 8-bit window maps to 0 and 255."""
    return window_of_samples([window_samples(pixels, step=2) for pixels in slices])


def window_samples(pixels, step=None):
    """The pixels of a slice that its series' window is taken from: every `step`-th in each direction (by default,
    about 256 along the longer side). Every second pixel gives the same percentiles at a quarter of the cost."""
    step = step or max(1, max(pixels.shape) // 256)
    return pixels[::step, ::step].ravel()


def window_of_samples(samples):
    """The (low, high) window of a series from its slices' window_samples."""
    return tuple(np.percentile(np.concatenate(samples), WINDOW_PERCENTILES))


def to_uint8(image, window):
    """Map intensities to 0..255 linearly through a (low, high) window, clipping outside it."""
    low, high = window
    return np.clip((image - low) * (255.0 / max(high - low, 1e-6)), 0, 255).astype(np.uint8)


def series_instances(series_dir):
    """Sorted instance numbers of a series; the competition names each file by its instance number."""
    return sorted(int(path.stem) for path in series_dir.glob("*.dcm") if path.stem.isdigit())


def neighbour_indices(index, count):
    """The previous, given and next index among `count` slices; the edge slice stands in for a missing neighbour."""
    return max(index - 1, 0), index, min(index + 1, count - 1)


def slice_triplet(instance_numbers, instance_number):
    """The previous, given and next instance in a sorted list, reusing the edge slice at either end."""
    indices = neighbour_indices(instance_numbers.index(instance_number), len(instance_numbers))
    return tuple(instance_numbers[index] for index in indices)


def neighbours_along_normal(stacks):
    """{instance number: (previous, itself, next)} by position along the normal, within each sub-stack (read_stacks);
    the edge slice stands in for its missing neighbour at either end."""
    neighbours = {}
    for stack in stacks:
        numbers = stack.instance_numbers
        for number in numbers:
            neighbours[number] = slice_triplet(numbers, number)
    return neighbours


def read_slice_files(paths, without_spacing=None):
    """Read DICOM slices given as {key: path}: ({key: read_slice's result}, "path: cause" of each broken file)."""
    slices, undecodable_files = {}, []
    for key, path in paths.items():
        try:
            slices[key] = read_slice(path, without_spacing)
        # Decoders fail in many ways on damaged or unsupported files; any failure means "skip
        # this file and name it", never a crashed run.
        except Exception as error:
            undecodable_files.append(f"{path}: {decoding_cause(error)}")
    return slices, undecodable_files


# Geometry, in the patient's coordinates (DICOM LPS, mm: +x the patient's left, +y posterior, +z the head).
# A pixel (x, y) of a slice is at P = ImagePositionPatient + x * column spacing * r + y * row spacing * c, with r and
# c the row and column directions of ImageOrientationPatient. Slices are ordered by their position along the
# normal n = r × c, never by InstanceNumber, and the slice spacing comes from those positions, since
# SliceThickness and SpacingBetweenSlices are missing in the hidden test set.
ORIENTATION_TOLERANCE = 0.02  # Direction cosines closer than this belong to the same sub-stack.


@dataclass(frozen=True)
class SliceHeader:
    """The tags of one DICOM slice that place it in the world."""

    path: Path
    instance_number: int
    position: tuple  # ImagePositionPatient: the world point of the centre of pixel (0, 0).
    orientation: tuple  # ImageOrientationPatient: r, then c.
    pixel_spacing: tuple  # (row spacing, column spacing), mm; (1, 1) when the tag is missing.
    shape: tuple  # (rows, columns)


@dataclass(frozen=True)
class Stack:
    """Parallel slices of one series, sorted along their normal: a whole sagittal series, or one of the tilted
    sub-stacks an axial series may hold. Index i is the i-th slice in that order."""

    series_id: str
    slices: tuple  # SliceHeader, sorted by position along the normal.

    @property
    def row_direction(self):
        return np.asarray(self.slices[0].orientation[:3], float)

    @property
    def column_direction(self):
        return np.asarray(self.slices[0].orientation[3:], float)

    @property
    def normal(self):
        normal = np.cross(self.row_direction, self.column_direction)
        return normal / np.linalg.norm(normal)

    @property
    def positions(self):
        return np.array([slice_.position for slice_ in self.slices], float)

    @property
    def instance_numbers(self):
        return [slice_.instance_number for slice_ in self.slices]

    @property
    def pixel_spacing(self):
        return self.slices[0].pixel_spacing

    @property
    def shape(self):
        return self.slices[0].shape

    @property
    def slice_spacing(self):
        """The median distance between neighbouring slices along the normal (0 for a single slice)."""
        along = self.positions @ self.normal
        return float(np.median(np.diff(along))) if len(along) > 1 else 0.0

    def pixel_to_world(self, index, x, y):
        """The world point of pixel (x, y) (columns, rows; fractions allowed) on slice `index`."""
        row_spacing, column_spacing = self.pixel_spacing
        return (
            self.positions[index]
            + np.multiply.outer(np.asarray(x, float), self.row_direction * column_spacing)
            + np.multiply.outer(np.asarray(y, float), self.column_direction * row_spacing)
        )

    def world_to_pixel(self, point, index):
        """(x, y, signed distance in mm along the normal) of a world point relative to slice `index`."""
        offset = np.asarray(point, float) - self.positions[index]
        row_spacing, column_spacing = self.pixel_spacing
        return (
            float(offset @ self.row_direction / column_spacing),
            float(offset @ self.column_direction / row_spacing),
            float(offset @ self.normal),
        )

    def plane_distances(self, point):
        """The signed distance (mm) of a world point to every slice plane, in stack order."""
        return (np.asarray(point, float) - self.positions) @ self.normal

    def contains(self, x, y):
        rows, columns = self.shape
        return -0.5 <= x <= columns - 0.5 and -0.5 <= y <= rows - 0.5


def read_slice_header(path):
    """The geometry tags of one DICOM file, without reading its pixels; None if it has none."""
    try:
        dataset = load_pydicom().dcmread(path, stop_before_pixels=True, force=True)
    except Exception:  # A damaged or foreign file: it simply does not take part in the geometry.
        return None
    return slice_header(dataset, path)


def slice_header(dataset, path):
    """The geometry tags of a file already read (its dataset); None if it has none."""
    try:
        position = tuple(float(value) for value in dataset.ImagePositionPatient)
        orientation = tuple(float(value) for value in dataset.ImageOrientationPatient)
        spacing = tuple(float(value) for value in (dataset.get("PixelSpacing") or (1.0, 1.0)))
        shape = (int(dataset.Rows), int(dataset.Columns))
        # The competition names each file by its instance number, and its labels use that name.
        stem = Path(path).stem
        instance_number = int(stem) if stem.isdigit() else int(dataset.InstanceNumber)
    except Exception:  # A damaged or foreign file: it simply does not take part in the geometry.
        return None
    return SliceHeader(Path(path), instance_number, position, orientation, spacing, shape)


def read_stacks(series_dir):
    """A series as its stacks: slices grouped by orientation, pixel spacing and size, each sorted along its normal.
    Largest stack first."""
    headers = [header for header in map(read_slice_header, sorted(Path(series_dir).glob("*.dcm"))) if header]
    return group_stacks(series_dir, headers)


def group_stacks(series_dir, headers):
    """read_stacks' stacks from the series' SliceHeaders."""
    groups = []
    for header in headers:
        for group in groups:
            first = group[0]
            if (
                np.abs(np.subtract(first.orientation, header.orientation)).max() < ORIENTATION_TOLERANCE
                and np.allclose(first.pixel_spacing, header.pixel_spacing)
                and first.shape == header.shape
            ):
                group.append(header)
                break
        else:
            groups.append([header])
    stacks = []
    for group in groups:
        normal = np.cross(group[0].orientation[:3], group[0].orientation[3:])
        group.sort(key=lambda header: (np.dot(header.position, normal), header.instance_number))
        stacks.append(Stack(Path(series_dir).name, tuple(group)))
    return sorted(stacks, key=lambda stack: -len(stack.slices))


# Where every slice of a series is needed (the localiser's slices), its files are each read once, whole, and decoded
# one at a time: the tags give the stacks, the pixels the localiser's slices and, in the same pass, prepare's crops.


@dataclass
class SeriesFiles:
    """Every DICOM file of one series, read once with its pixel data still encoded, to be decoded one slice at a
    time (decode): so a series never lies in memory decoded, and no file is read or decoded twice."""

    stacks: list  # read_stacks' stacks, from the files' tags
    datasets: dict  # path → its pydicom dataset, until decoded
    undecodable: dict  # path → "path: cause", for a file that cannot be read or decoded
    keep: set = field(default_factory=set)  # paths whose decoded slice is kept for a crop, then the cache
    kept: dict = field(default_factory=dict)  # path → read_slice's result
    without_spacing: list = field(default_factory=list)  # paths of slices without PixelSpacing

    def decode(self, path):
        """read_slice's result for one file of the series, decoded once (a kept one is handed out again); None if
        it cannot be read or decoded. Its encoded data is released."""
        if path in self.kept:
            return self.kept[path]
        dataset = self.datasets.pop(path, None)
        if dataset is None:
            return None
        try:
            decoded = slice_pixels(dataset, path, self.without_spacing)
        except Exception as error:  # As read_slice_files: a broken file is skipped and named, never a crash.
            self.undecodable[path] = f"{path}: {decoding_cause(error)}"
            return None
        if path in self.keep:
            self.kept[path] = decoded
        return decoded

    def slices(self, paths):
        """read_slice_files' result for the given {key: path} of this series."""
        slices = {key: self.decode(path) for key, path in paths.items()}
        failed = [
            self.undecodable.get(path, f"{path}: file not found") for key, path in paths.items() if not slices[key]
        ]
        return {key: value for key, value in slices.items() if value}, failed


def read_series_files(series_dir):
    """A series' files, each read once (SeriesFiles); a file that cannot be read is named, one without position
    tags takes no part in the stacks."""
    pydicom = load_pydicom()
    datasets, undecodable, headers = {}, {}, []
    for path in sorted(Path(series_dir).glob("*.dcm")):
        try:
            datasets[path] = pydicom.dcmread(path, force=True)
        except Exception as error:
            undecodable[path] = f"{path}: {decoding_cause(error)}"
            continue
        header = slice_header(datasets[path], path)
        if header:
            headers.append(header)
    return SeriesFiles(group_stacks(series_dir, headers), datasets, undecodable)


# The level localiser reads whole series: every slice windowed like prepare's crops, resized to the localiser's
# square input and kept as uint8 (LOCALISER_IMAGE_SIZE² bytes a slice), each stack with its geometry.


@dataclass
class Volume:
    """One stack's slices, windowed to uint8 and resized to the localiser's input, with their geometry."""

    stack: Stack
    images: np.ndarray  # (slices, size, size) uint8, in stack order.


def read_volume(stack, image_size, files):
    """Decode every slice of a stack from its series' files (read_series_files), one at a time, resize it to the
    localiser's input and window the stack as a whole; None if none of its slices decodes. Only the resized slices
    and a sample of each slice's pixels are held, never the series decoded; a slice that cannot be decoded is black."""
    resized = np.zeros((len(stack.slices), image_size, image_size), np.float32)
    samples = []
    for index, header in enumerate(stack.slices):
        decoded = files.decode(header.path)
        if decoded is not None:
            samples.append(window_samples(decoded[0]))
            resized[index] = cv2.resize(decoded[0], (image_size, image_size), interpolation=cv2.INTER_AREA)
    if not samples:
        return None
    return Volume(stack, to_uint8(resized, window_of_samples(samples)))


# Each study's slices are read once and kept in a cache: the volumes of every stack as one uint8 array in
# CACHE/{study_id}.npy, memory-mapped when read, and their geometry in CACHE/{study_id}.json, which also records what
# they were made from (each file's size and time, the image size, the window). A cache that no longer matches its
# sources is made again, never mixed with them.
SLICE_CACHE_VERSION = 2


def slice_cache(output_dir, split):
    """The slice cache of a split's studies, in a run's output folder."""
    return output_dir / "cache" / f"{split}_slices"


def volume_stacks(study_id, volumes):
    """{(study_id, series_id): (stack, ...)} of a study's volumes ({kind: [Volume, ...]})."""
    stacks = {}
    for volume in (volume for kind_volumes in volumes.values() for volume in kind_volumes):
        key = (study_id, volume.stack.series_id)
        stacks[key] = stacks.get(key, ()) + (volume.stack,)
    return stacks


def split_slice_cache(competition_dir, output_dir, split, image_size):
    """The SliceCache of one split of a competition, in a run's output folder."""
    series = study_series(read_series_descriptions(competition_dir, split))
    return SliceCache(slice_cache(output_dir, split), image_size, series)


@dataclass(frozen=True)
class SliceCache:
    """A split's slice cache as prepare uses it (cut_crops): where it is, the localiser's input size, and each
    study's listed series ({study_id: {kind: [series_id, ...]}})."""

    directory: Path
    image_size: int
    series: dict


def cached_stacks(cache, images_dir, study_ids):
    """({(study_id, series_id): stacks} of the studies whose cached slices are current, the set of those studies)."""
    known, current = {}, set()
    for study_id in sorted(set(study_ids) & set(cache.series)):
        source = volume_sources(images_dir / study_id, cache.series[study_id], cache.image_size)
        volumes = read_cached_volumes(cache.directory, study_id, images_dir, source)
        if volumes is None:
            continue
        current.add(study_id)
        known |= volume_stacks(study_id, volumes)
    return known, current


def study_volumes(images_dir, study_id, series_by_kind, image_size, cache_dir=None):
    """{kind: [Volume, ...]}: every stack of every series of each kind, windowed and resized to the localiser's input,
    the largest stack of each kind first; from cache_dir when it was made from the same files and settings."""
    source = volume_sources(images_dir / study_id, series_by_kind, image_size)
    if cache_dir is not None:
        cached = read_cached_volumes(cache_dir, study_id, images_dir, source)
        if cached is not None:
            return cached
    volumes = {}
    for kind, _, files in listed_series_files(images_dir / study_id, series_by_kind):
        add_volumes(volumes, kind, files, image_size)
    return cached_volumes(cache_dir, study_id, images_dir, volumes, source)


def listed_series_files(study_dir, series_by_kind):
    """(kind, series_id, SeriesFiles) for each listed series of a study, read one series at a time."""
    for kind, series_ids in series_by_kind.items():
        for series_id in series_ids:
            yield kind, series_id, read_series_files(study_dir / series_id)


def add_volumes(volumes, kind, files, image_size):
    """Add a series' stacks to a study's {kind: [Volume, ...]}, each kind's largest stack first."""
    for stack in files.stacks:
        volume = read_volume(stack, image_size, files)
        if volume is not None:
            volumes.setdefault(kind, []).append(volume)
    volumes.get(kind, []).sort(key=lambda volume: -len(volume.images))


def cached_volumes(cache_dir, study_id, images_dir, volumes, source):
    """A study's volumes as read, or with a cache_dir, written there and read back memory-mapped, so that RAM stays
    flat in the number of studies."""
    if cache_dir is None:
        return volumes
    write_cached_volumes(cache_dir, study_id, volumes, source)
    return read_cached_volumes(cache_dir, study_id, images_dir, source)


def cache_volumes(images_dir, study_id, series_by_kind, image_size, cache_dir):
    """Make sure a study's volumes are in the cache (a worker process's job: nothing but that comes back)."""
    study_volumes(images_dir, study_id, series_by_kind, image_size, cache_dir)


def volume_sources(study_dir, series_by_kind, image_size):
    """What a study's cached volumes are made from, as JSON reads it back: the files (size and modification time),
    the series of each kind, the image size and the window."""
    files = {}
    for series_id in sorted({series_id for ids in series_by_kind.values() for series_id in ids}):
        for path in sorted((study_dir / series_id).glob("*.dcm")):
            status = path.stat()
            files[f"{series_id}/{path.name}"] = [status.st_size, status.st_mtime_ns]
    return {
        "version": SLICE_CACHE_VERSION,
        "image_size": image_size,
        "window_percentiles": list(WINDOW_PERCENTILES),
        "series": {kind: list(ids) for kind, ids in sorted(series_by_kind.items())},
        "files": files,
    }


def write_cached_volumes(cache_dir, study_id, volumes, source):
    """Write a study's volumes to the cache: the slices first, then the JSON that says they are current."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    entries, images = [], []
    for kind, kind_volumes in volumes.items():
        for volume in kind_volumes:
            slices = [
                [Path(header.path).name, header.instance_number, header.position, header.orientation]
                + [header.pixel_spacing, header.shape]
                for header in volume.stack.slices
            ]
            entries.append({"kind": kind, "series_id": volume.stack.series_id, "slices": slices})
            images.append(volume.images)
    (cache_dir / f"{study_id}.json").unlink(missing_ok=True)  # Stale from here until the new one is written.
    stacked = np.concatenate(images) if images else np.zeros((0, 1, 1), np.uint8)
    write_atomically(cache_dir / f"{study_id}.npy", lambda path: np.save(path, stacked))
    write_json({"source": source, "volumes": entries}, cache_dir / f"{study_id}.json")


def read_cached_volumes(cache_dir, study_id, images_dir, source):
    """A study's volumes from the cache, memory-mapped; None if it is missing, damaged or made from other sources."""
    try:
        cached = json.loads((cache_dir / f"{study_id}.json").read_text())
        if cached["source"] != source:
            return None
        images = np.load(cache_dir / f"{study_id}.npy", mmap_mode="r")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    volumes, start = {}, 0
    for entry in cached["volumes"]:
        series_dir = images_dir / study_id / entry["series_id"]
        headers = tuple(
            SliceHeader(series_dir / name, number, tuple(position), tuple(orientation), tuple(spacing), tuple(shape))
            for name, number, position, orientation, spacing, shape in entry["slices"]
        )
        volume = Volume(Stack(entry["series_id"], headers), images[start : start + len(headers)])
        volumes.setdefault(entry["kind"], []).append(volume)
        start += len(headers)
    return volumes if start == len(images) else None


# == 5. crops ==========================================================================================================

# Turns the competition's DICOM layout into the seed layout: one 2.5D crop per labelled (study, condition,
# level) and a CSV naming it. The CSV joins are plain pandas and need no images, so they can be checked on the
# real CSVs alone; the pixel work is per series.


def prepare_competition(
    competition_dir,
    out_dir,
    split="train",
    coordinates=None,
    crop_mm=PREPARE_CROP_MM,
    crop_pixels=PREPARE_CROP_PIXELS,
    workers=WORKERS,
    cache=None,
):
    """Write the seed layout (OUT/{split}.csv and OUT/images/{split}/) from the competition's files.

    Train rows without a label, coordinate or image are left out; test rows are all kept, with
    an empty image_path where there is no crop. Existing crops are kept, so a rerun resumes.
    With the split's slice cache (SliceCache), its studies are read in one pass for both (cut_crops).
    Returns a summary dict with counts and the names of missing and undecodable files.
    """
    competition_dir, out_dir = Path(competition_dir), Path(out_dir)
    rows, skipped = read_split_rows(competition_dir, split, coordinates)
    images_dir = competition_dir / f"{split}_images"
    results = cut_crops(rows, images_dir, out_dir, f"images/{split}", crop_mm, crop_pixels, workers, cache)
    written = [name for result in results for name in result.written]
    kept = [name for result in results for name in result.kept]
    outside = [name for result in results for name in result.outside_image]
    has_image = rows["image_path"] != ""
    if split == "train":
        table = rows.loc[has_image, ["row_id", "image_path", *CLASS_NAMES]]
    elif CROP_WEIGHT in rows:  # Rows mixed over several slices: one line per crop, each weighted.
        table = rows[["row_id", "image_path", CROP_WEIGHT]].fillna({CROP_WEIGHT: 1.0})
    else:
        table = rows[["row_id", "image_path"]]
    csv_path = out_dir / f"{split}.csv"
    write_csv(table, csv_path)
    return {
        "split": split,
        "csv": str(csv_path),
        "rows": table["row_id"].nunique(),
        "images_written": len(written),
        "images_kept": len(kept),
        **skipped,
        "outside_image": len(outside),
        "without_image": int((rows["series_id"].notna() & ~has_image & ~rows["crop"].isin(outside)).sum()),
        "outside_image_row_ids": outside,
        "missing_instance_row_ids": [row_id for result in results for row_id in result.missing_instance],
        # Several crops can miss the same file; name it once.
        "missing_files": list(dict.fromkeys(name for result in results for name in result.missing_files)),
        "undecodable_files": [name for result in results for name in result.undecodable_files],
        "series_without_spacing": list(
            dict.fromkeys(str(Path(path).parent) for result in results for path in result.without_spacing)
        ),
    }


def cut_crops(rows, images_dir, out_dir, crops_folder, crop_mm, crop_pixels, workers, cache=None):
    """Cut the crops of `rows` (those with a coordinate) from the DICOMs in images_dir into out_dir/crops_folder,
    keeping those already cut from the same source; sets rows' "crop" name and "image_path" (relative to out_dir,
    empty where there is no crop). Returns one SeriesResult per series.

    With the split's slice cache (SliceCache), a study already in it gives its stacks (no tags read again), and a
    study not yet in it is read in one pass that fills it and cuts the crops (cache_and_crop_study)."""
    rows["crop"] = crop_names(rows)
    output_dir = out_dir / crops_folder
    known, uncached = {}, set()
    if cache is not None:
        study_ids = set(rows.dropna(subset=["series_id"])["study_id"])
        known, cached = cached_stacks(cache, images_dir, study_ids)
        uncached = (study_ids & set(cache.series)) - cached
    tasks = crop_tasks(rows, images_dir, output_dir, known)
    if tasks:
        if not images_dir.is_dir():
            raise InputError(f"{images_dir}: folder not found. Check --competition-dir.")
        pydicom_for_workers()
    output_dir.mkdir(parents=True, exist_ok=True)
    refresh_crop_record(output_dir, crop_sources(tasks, crop_mm, crop_pixels))
    try:
        results = run_crop_tasks(crop_jobs(tasks, crop_mm, crop_pixels, cache, uncached), workers)
    finally:  # A worker stopped mid-write (result_of_worker) leaves its temporary file (write_atomically): not kept.
        for partial in output_dir.glob(".partial-*"):
            partial.unlink(missing_ok=True)
    cut = {name for result in results for name in result.written + result.kept}
    rows["image_path"] = (f"{crops_folder}/" + rows["crop"] + ".png").where(rows["crop"].isin(cut), "")
    return results


@dataclass(frozen=True)
class Crop:
    """One requested crop: which instance, where on it, and where the PNG goes."""

    name: str  # its row_id, or row_id_instance where a row's prediction mixes several slices (crop_names)
    instance_number: int
    x: float
    y: float
    output_path: Path


@dataclass(frozen=True)
class SeriesTask:
    """All crops requested from one series, so each slice is read and windowed once; with the series' stacks when
    they are known (from the slice cache, or a study just read), so its files' tags are not read again."""

    series_dir: Path
    crops: tuple
    stacks: tuple | None = None


@dataclass
class SeriesResult:
    """What happened to one series' crops, for the summary."""

    written: list = field(default_factory=list)
    kept: list = field(default_factory=list)
    missing_files: list = field(default_factory=list)
    undecodable_files: list = field(default_factory=list)
    missing_instance: list = field(default_factory=list)  # Row ids whose labelled instance the series lacks.
    outside_image: list = field(default_factory=list)  # Row ids whose crop would be mostly past the slice's edge.
    without_spacing: list = field(default_factory=list)  # Slices without PixelSpacing, taken as 1 mm per pixel.


def crop_inside_share(shape, x, y, row_spacing, column_spacing, crop_mm):
    """The share of a crop_mm square centred on (x, y) that lies on a slice of `shape` (rows, columns) pixels.

    Pixel centres are at whole numbers, so the slice covers -0.5 to columns - 0.5 across and likewise down."""
    shares = []
    for centre, size, spacing in ((x, shape[1], column_spacing), (y, shape[0], row_spacing)):
        half = crop_mm / spacing / 2
        overlap = min(centre + half, size - 0.5) - max(centre - half, -0.5)
        shares.append(max(overlap, 0.0) / (2 * half))
    return shares[0] * shares[1]


def crop_around(image, x, y, row_spacing, column_spacing, crop_mm, crop_pixels, fill=0):
    """Cut a crop_mm square centred exactly on (x, y) and resample it to crop_pixels square.

    One affine warp does the cut and the resize, so the point lands on the output's centre
    with sub-pixel accuracy; parts past the image edge are filled with the value fill.
    """
    source_per_output_x = crop_mm / column_spacing / crop_pixels
    source_per_output_y = crop_mm / row_spacing / crop_pixels
    centre = (crop_pixels - 1) / 2
    output_to_source = np.array(
        [
            [source_per_output_x, 0.0, x - centre * source_per_output_x],
            [0.0, source_per_output_y, y - centre * source_per_output_y],
        ]
    )
    return cv2.warpAffine(
        image,
        output_to_source,
        (crop_pixels, crop_pixels),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=fill,
    )


def write_png(path, image):
    """Write a PNG atomically: a killed run must not leave a truncated crop that a rerun would keep."""
    _, encoded = cv2.imencode(".png", image)
    write_atomically(path, encoded.tofile)


def crop_series(task, crop_mm, crop_pixels, files=None):
    """Write every missing crop of one series; a missing or broken file only skips its crops.

    A crop's red, green and blue channels are the previous, labelled and next slice along the normal. Its slices
    come from `files` when the series has just been read whole (read_series_files), else from their files; the
    stacks from `files`, the task, or the files' tags.
    """
    result = SeriesResult()
    pending = [crop for crop in task.crops if not crop.output_path.exists()]
    result.kept = [crop.name for crop in task.crops if crop not in pending]
    if not pending:
        return result
    if not task.series_dir.is_dir():
        result.missing_files.append(f"{task.series_dir}/")
        return result
    triplets = crop_triplets(task, pending, files.stacks if files else task.stacks, result)
    # Read the slices of every crop, also those already on disk, so the window does not depend
    # on which crops a resumed run still had to write.
    paths = triplet_paths(task, triplets)
    if files is None:
        slices, result.undecodable_files = read_slice_files(paths, result.without_spacing)
    else:
        files.keep.update(paths.values())  # Decoded once: the localiser's slices of the series are made from them too.
        slices, result.undecodable_files = files.slices(paths)
        result.without_spacing = list(files.without_spacing)
    if not slices:
        return result
    window = intensity_window([pixels for pixels, _, _ in slices.values()])
    for crop in pending:
        if crop.instance_number not in slices:
            continue
        pixels, row_spacing, column_spacing = slices[crop.instance_number]
        if crop_inside_share(pixels.shape, crop.x, crop.y, row_spacing, column_spacing, crop_mm) < MINIMUM_CROP_INSIDE:
            result.outside_image.append(crop.name)  # Would be mostly black: skipped, never trained on.
            continue
        channels = []
        for instance_number in triplets[crop]:
            # A broken neighbour is replaced by the labelled slice, as at the ends of the series.
            pixels, row_spacing, column_spacing = slices.get(instance_number, slices[crop.instance_number])
            # Filling with the window's low end makes the padding black, like empty air.
            channel = crop_around(pixels, crop.x, crop.y, row_spacing, column_spacing, crop_mm, crop_pixels, window[0])
            channels.append(channel)
        # OpenCV writes blue, green, red, so reverse the channels to store them as RGB.
        write_png(crop.output_path, to_uint8(np.stack(channels[::-1], axis=-1), window))
        result.written.append(crop.name)
    return result


def crop_triplets(task, pending, stacks, result):
    """{crop: (previous, its own, next instance number)} for a series' crops, from its stacks (read here when not
    given); a pending crop whose instance is missing is recorded in result."""
    instance_numbers = series_instances(task.series_dir)
    neighbours = neighbours_along_normal(read_stacks(task.series_dir) if stacks is None else stacks)
    triplets = {}
    for crop in task.crops:
        if crop.instance_number in neighbours:
            triplets[crop] = neighbours[crop.instance_number]
        elif crop.instance_number in instance_numbers:  # A file without geometry tags: its number's neighbours.
            triplets[crop] = slice_triplet(instance_numbers, crop.instance_number)
        elif crop in pending:
            result.missing_files.append(str(task.series_dir / f"{crop.instance_number}.dcm"))
            result.missing_instance.append(crop.name)
    return triplets


def triplet_paths(task, triplets):
    """{instance number: path} of every slice the crops' triplets use."""
    return {number: task.series_dir / f"{number}.dcm" for number in sorted(set().union(*triplets.values()))}


def crop_names(rows):
    """Each row's crop name: its row_id, or row_id_instance for a row_id listed once per slice it mixes."""
    several = rows["row_id"].duplicated(keep=False)
    instance = rows["instance_number"].astype("Int64").astype(str)
    return rows["row_id"].where(~several, rows["row_id"] + "_" + instance)


def crop_tasks(rows, images_dir, output_dir, known_stacks=None):
    """Group the rows that have a coordinate (and their crop name) into one task per series, with the series' stacks
    where known_stacks ({(study_id, series_id): stacks}) has them."""
    known_stacks = known_stacks or {}
    crops_by_series = {}
    points = rows.dropna(subset=["series_id"])[["study_id", "series_id", "crop", "instance_number", "x", "y"]]
    # One pass over plain tuples: a pandas groupby takes seconds for the ~6,000 series.
    for study_id, series_id, name, instance_number, x, y in points.itertuples(index=False):
        crop = Crop(name, int(instance_number), x, y, output_dir / f"{name}.png")
        crops_by_series.setdefault((study_id, series_id), []).append(crop)
    return [
        SeriesTask(images_dir / study_id / series_id, tuple(crops), known_stacks.get((study_id, series_id)))
        for (study_id, series_id), crops in crops_by_series.items()
    ]


# Beside each crop folder (OUT/images/train), OUT/images/train_crops.csv records what every crop was cut from. A
# rerun keeps a crop only if it would be cut from the same thing again, so that crops of other settings, points or
# data never mix with the new ones.


def crop_sources(tasks, crop_mm, crop_pixels):
    """{row_id: what its crop is cut from}: the file, the point, the size, and the series' labelled instances
    (they choose the slices that set the series' intensity window)."""
    sources = {}
    for task in tasks:
        series = task.series_dir.resolve()
        instances = ",".join(str(number) for number in sorted({crop.instance_number for crop in task.crops}))
        for crop in task.crops:
            sources[crop.name] = (
                f"{series}/{crop.instance_number}.dcm at ({crop.x!r}, {crop.y!r}); {crop_mm!r} mm, {crop_pixels} px; "
                f"window from instances {instances}"
            )
    return sources


def refresh_crop_record(crops_dir, sources):
    """Delete the crops in crops_dir that were cut from anything but `sources` says (or are not recorded at all),
    then record `sources`; returns how many were deleted. Done before cutting, so a killed run resumes safely."""
    record_path = crops_dir.with_name(f"{crops_dir.name}_crops.csv")
    previous = {}
    if record_path.is_file():
        recorded = pd.read_csv(record_path, dtype=str, keep_default_na=False)
        previous = dict(zip(recorded["row_id"], recorded["source"]))
    stale = [path for path in crops_dir.glob("*.png") if previous.get(path.stem) != sources.get(path.stem, "")]
    for path in stale:
        path.unlink()
    if stale:
        print(
            f"note: {len(stale):,} crop(s) in {crops_dir} came from other points, files or settings (--crop-mm, "
            "--crop-pixels), or from an earlier version; they are cut again or removed."
        )
    write_csv(pd.DataFrame({"row_id": list(sources), "source": list(sources.values())}), record_path)
    return len(stale)


@dataclass(frozen=True)
class CropJob:
    """Work for one worker process: a function returning a list of SeriesResult, how many crops it cuts, and the
    folder it reads (named if the worker dies)."""

    function: object
    arguments: tuple
    crops: int
    reads: str


def crop_jobs(tasks, crop_mm, crop_pixels, cache=None, uncached=()):
    """One job per series task; but a study of `uncached` (not yet in the slice cache) is one job that reads it once
    for both the cache and its crops (cache_and_crop_study)."""
    jobs, by_study = [], {}
    for task in tasks:
        study_dir = task.series_dir.parent
        if study_dir.name in uncached:
            by_study.setdefault(study_dir, []).append(task)
        else:
            jobs.append(CropJob(crop_one_series, (task, crop_mm, crop_pixels), len(task.crops), str(task.series_dir)))
    for study_dir, study_tasks in by_study.items():
        arguments = (study_dir.parent, study_dir.name, cache, study_tasks, crop_mm, crop_pixels)
        crops = sum(len(task.crops) for task in study_tasks)
        jobs.append(CropJob(cache_and_crop_study, arguments, crops, str(study_dir)))
    return jobs


def crop_one_series(task, crop_mm, crop_pixels):
    return [crop_series(task, crop_mm, crop_pixels)]


def run_crop_tasks(jobs, workers):
    """Run the crop jobs on `workers` processes (decoding_pool), showing progress; returns their SeriesResults.

    On a terminal the progress is one line, rewritten as crops are cut, with the time left; in a saved log or a
    notebook, a plain line every tenth of the crops. (Not Keras' Progbar, so that prepare can do without Keras.)
    """
    total = sum(job.crops for job in jobs)
    on_terminal = sys.stdout.isatty()
    results, done, tenths, started = [], 0, 0, time.time()
    with decoding_pool(workers) as pool:
        futures = [pool.submit(job.function, *job.arguments) for job in jobs]
        for job, future in zip(jobs, futures):
            results += result_of_worker(future, futures, [job.reads for job in jobs])
            done += job.crops
            progress = f"crops: {done:,}/{total:,} ({done / total:.0%})"
            if on_terminal:
                left = (time.time() - started) * (total - done) / max(done, 1)
                print(f"\r{progress}, {left:.0f} s left ", end="", flush=True)
            elif done * 10 // total > tenths:
                tenths = done * 10 // total
                print(progress, flush=True)
    if on_terminal and jobs:
        print()
    return results


def cache_and_crop_study(images_dir, study_id, cache, tasks, crop_mm, crop_pixels):
    """One study read in one pass: each file of its listed series read and decoded once, for the localiser's slice
    cache and for the crops that the tasks ask of those series (a series' crops are cut first, and the slices they
    decoded are kept for its volumes). Tasks on series the listing lacks are cut as usual. Returns the tasks'
    SeriesResults."""
    series_by_kind = cache.series[study_id]
    source = volume_sources(images_dir / study_id, series_by_kind, cache.image_size)
    by_series = {task.series_dir.name: task for task in tasks}
    volumes, results = {}, []
    for kind, series_id, files in listed_series_files(images_dir / study_id, series_by_kind):
        task = by_series.pop(series_id, None)
        if task is not None:
            results.append(crop_series(task, crop_mm, crop_pixels, files))
        add_volumes(volumes, kind, files, cache.image_size)
    write_cached_volumes(cache.directory, study_id, volumes, source)
    return results + [crop_series(task, crop_mm, crop_pixels) for task in by_series.values()]


def decoding_pool(workers):
    """Where DICOMs are decoded in parallel: `workers` processes, since pydicom holds Python's lock (threads gave
    about 1.2x at 2 workers). They are forked, so they need nothing importable (the script may be a notebook cell),
    and only read files and run NumPy and OpenCV, never TensorFlow. Threads where fork is missing (Windows; macOS
    does not fork by default), and for one worker. Processes that prepare started early (start_decoding_workers)
    are taken as they are."""
    global started_workers
    if started_workers is not None and started_workers.workers == workers:
        pool, started_workers = started_workers, None
        return pool
    if workers > 1 and "fork" in multiprocessing.get_all_start_methods():
        findable_by_pickle()
        return DecodingProcesses(workers, mp_context=multiprocessing.get_context("fork"))
    return concurrent.futures.ThreadPoolExecutor(max_workers=workers)


def findable_by_pickle():
    """Pickle sends a worker a function or class by its module and name, and this script's say they are __main__'s.
    Run under a profiler (python -m cProfile script.py ...) or runpy, __main__ is another module: this script's
    functions and classes are then also set on it, where the forked workers and the parent will look them up."""
    main = sys.modules.get("__main__")
    if main is None or vars(main) is globals():
        return
    for name, value in list(globals().items()):
        if getattr(value, "__module__", None) == "__main__" and not hasattr(main, name):
            setattr(main, name, value)


started_workers = None  # prepare's DecodingProcesses, started before pandas is imported; the next decoding_pool's


def start_decoding_workers(command, options):
    """Fork prepare's worker processes at once, before main imports pandas (import_pandas), each importing pydicom
    meanwhile; the first decoding_pool takes them, and discard_started_workers ends them if none does. Only prepare's:
    the commands that run a model import TensorFlow for seconds before they read any DICOM."""
    global started_workers
    if command == "prepare" and options.workers > 1 and "fork" in multiprocessing.get_all_start_methods():
        started_workers = decoding_pool(options.workers)
        started_workers.start_pydicom_imports()


def import_pydicom():
    """load_pydicom in a worker process, which cannot send the module back."""
    load_pydicom()


def pydicom_for_workers():
    """Have pydicom imported before the first job is sent: by the workers themselves where prepare started them early
    (start_decoding_workers), or else once by the parent, so that the workers it forks next inherit it. Either way a
    missing pydicom is one InputError."""
    if started_workers is None:
        load_pydicom()
        return
    for future in started_workers.pydicom_imports:
        future.result()


def discard_started_workers():
    """End the workers that start_decoding_workers started and no decoding_pool took: the run stopped first."""
    global started_workers
    if started_workers is not None:
        pool, started_workers = started_workers, None
        pool.shutdown(cancel_futures=True)


WORKER_STALL_SECONDS = 600  # one series or study a worker has not decoded in this long: it is stuck, not slow


class DecodingProcesses(concurrent.futures.ProcessPoolExecutor):
    """Worker processes that, when the run stops with an error (result_of_worker), are stopped with it rather than
    waited for: a stuck worker must not keep the run from ending."""

    def __init__(self, workers, **options):
        super().__init__(workers, **options)
        self.workers = workers
        self.pydicom_imports = []  # import_pydicom's futures, one a worker

    def start_pydicom_imports(self):
        """Have each worker import pydicom now, in parallel with what the parent does meanwhile."""
        self.pydicom_imports = [self.submit(import_pydicom) for _ in range(self.workers)]

    def __exit__(self, kind, error, traceback):
        if kind is None:
            return super().__exit__(kind, error, traceback)
        processes = list((getattr(self, "_processes", None) or {}).values())
        for process in processes:
            process.terminate()
        for process in processes:
            process.join(timeout=10)  # Gone before the caller clears what they were writing.
        self.shutdown(wait=False, cancel_futures=True)
        return False


class InlinePool:
    """A pool's submit() that runs the job at once, in the calling thread."""

    def submit(self, function, *arguments):
        future = concurrent.futures.Future()
        future.set_result(function(*arguments))
        return future


def result_of_worker(future, futures, names):
    """A pooled task's result. A worker process that dies (out of memory, a crash inside a decoder) or stalls for
    WORKER_STALL_SECONDS ends the run with the series it may have been reading named, rather than a traceback or a
    hang; what was written is whole (atomic writes)."""
    try:
        return future.result(timeout=WORKER_STALL_SECONDS)
    except (concurrent.futures.BrokenExecutor, concurrent.futures.TimeoutError) as error:
        pending = [name for name, other in zip(names, futures) if not other.done() or unfinished(other)]
        what = "died (out of memory, or a crash in a DICOM decoder)"
        if isinstance(error, concurrent.futures.TimeoutError):
            what = f"has not finished one task in {WORKER_STALL_SECONDS} s"
        raise InputError(
            f"a worker process {what} while reading one of {list_some(pending)}. Rerun with --workers 1 (one "
            "thread, no worker processes) to find the file, or free memory."
        ) from None


def unfinished(future):
    """A done future that brought no result: cancelled, or ended by an error."""
    return future.cancelled() or future.exception() is not None


def undecodable_by_cause(undecodable_files):
    """{cause: paths} of the "path.dcm: cause" entries; causes that differ only in their numbers are one cause."""
    causes, wording = {}, {}
    for entry in undecodable_files:
        path, cause = entry.split(".dcm: ", 1) if ".dcm: " in entry else (entry, "cannot be decoded")
        key = re.sub(r"\d+", "#", cause)
        causes.setdefault(wording.setdefault(key, cause), []).append(path + ".dcm")
    return causes


def print_prepare_summary(summary):
    """Print what prepare did and what it skipped, and why."""
    split = summary["split"]
    print(
        f"Wrote {summary['rows']:,} rows to {summary['csv']} "
        f"({summary['images_written']:,} new crops, {summary['images_kept']:,} kept)."
    )
    reasons = {
        "blank_label": "with a blank label",
        "without_coordinate": "without a coordinate",
        "outside_image": "whose point is outside its slice or whose crop would be mostly past its edge",
        "without_image": "without an image (a missing or undecodable file)",
    }
    counts = ", ".join(f"{summary[key]:,} {reason}" for key, reason in reasons.items() if key in summary)
    print(f"Rows {'skipped' if split == 'train' else 'given an empty image_path'}: {counts}.")
    if summary.get("outside_image_row_ids"):
        print(f"Points outside their slice (or crops mostly past it): {list_some(summary['outside_image_row_ids'])}.")
    if summary.get("missing_instance_row_ids"):
        print(f"Points on an instance their series lacks: {list_some(summary['missing_instance_row_ids'])}.")
    if summary["missing_files"]:
        print(f"Missing series folders or instance files: {list_some(summary['missing_files'])}.")
    for cause, paths in undecodable_by_cause(summary["undecodable_files"]).items():
        print(f"Undecodable DICOM files: {len(paths):,} with {cause}: {list_some(paths, limit=3)}.")
    if summary.get("series_without_spacing"):
        series = summary["series_without_spacing"]
        print(f"Series without PixelSpacing, cropped at 1 mm per pixel: {len(series):,}: {list_some(series, limit=5)}.")


# == 6. images and augmentation ========================================================================================


class UnreadableImageError(InputError):
    """An image that passed the up-front check but could not be decoded when it was needed."""


def read_pixels(path):
    """The image as stored: 8- or 16-bit, with 1, 3 or 4 channels."""
    image = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise UnreadableImageError(f"{path}: cannot be decoded. Restore or replace the file, then run again.")
    return image


def resize(image, image_size):
    """Square image_size pixels, in the stored type (OpenCV's fastest path).

    Bilinear, except that shrinking by 2× or more averages areas, so that fine detail does not alias.
    """
    shrinking_a_lot = min(image.shape[:2]) >= 2 * image_size
    return cv2.resize(
        image, (image_size, image_size), interpolation=cv2.INTER_AREA if shrinking_a_lot else cv2.INTER_LINEAR
    )


def to_rgb(image):
    """float32 RGB in [0, 255]. A 16-bit image is scaled by its full range, so it reads like its 8-bit twin."""
    channels = 1 if image.ndim == 2 else image.shape[2]
    image = cv2.cvtColor(image, {1: cv2.COLOR_GRAY2RGB, 3: cv2.COLOR_BGR2RGB, 4: cv2.COLOR_BGRA2RGB}[channels])
    scale = 255.0 / np.iinfo(image.dtype).max if image.dtype.kind in "ui" else 255.0
    image = image.astype(np.float32)
    return image if scale == 1 else np.multiply(image, np.float32(scale), out=image)


def read_image(path, image_size, augmentation_seed=None, augmentation=None):
    """Any image OpenCV reads (8/16-bit; gray, BGR or BGRA) as float32 RGB in [0, 255], image_size square.

    With a seed, ImageDataGenerator-style augmentation (default AUGMENTATION) is applied first, in the stored
    type, where warping costs several times less than on three float channels.
    """
    image = resize(read_pixels(path), image_size)
    if augmentation_seed is not None:
        image = apply_transform(image, random_transform(image.shape, augmentation_seed, augmentation), augmentation)
    return to_rgb(image)


# What apply_transform honours of ImageDataGenerator's arguments. Any other key in AUGMENTATION (brightness_range,
# channel_shift_range, ...) is refused at the start of a run, by name, rather than silently ignored.
AUGMENTATION_KEYS = (
    "rotation_range",
    "width_shift_range",
    "height_shift_range",
    "shear_range",
    "zoom_range",
    "horizontal_flip",
    "vertical_flip",
    "fill_mode",
    "cval",
)
# ImageDataGenerator's fill modes (scipy's) as OpenCV border modes.
BORDER_MODES = {
    "nearest": cv2.BORDER_REPLICATE,
    "constant": cv2.BORDER_CONSTANT,
    "reflect": cv2.BORDER_REFLECT,
    "wrap": cv2.BORDER_WRAP,
}
# get_random_transform seeds NumPy's global generator, so threads take turns to keep draws repeatable.
sampling_lock = threading.Lock()


def check_augmentation(augmentation, name):
    """Refuse augmentation settings (the config block's `name`) that apply_transform would not honour, naming them."""
    unknown = sorted(set(augmentation) - set(AUGMENTATION_KEYS))
    if unknown:
        raise InputError(
            f"{name}: {', '.join(unknown)} not supported (supported: {', '.join(AUGMENTATION_KEYS)}). "
            "Remove them from the config block."
        )
    fill_mode = augmentation.get("fill_mode", "nearest")
    if fill_mode not in BORDER_MODES:
        raise InputError(f"{name}: fill_mode {fill_mode!r} is not one of {', '.join(BORDER_MODES)}.")


@functools.lru_cache(maxsize=4)
def generator_for(augmentation_items):
    return tf.keras.preprocessing.image.ImageDataGenerator(**dict(augmentation_items))


def augmentation_generator(augmentation=None):
    """The ImageDataGenerator of `augmentation` (default AUGMENTATION). It samples the parameters; OpenCV applies
    them, about 14× faster than its scipy path."""
    return generator_for(tuple(sorted((AUGMENTATION if augmentation is None else augmentation).items())))


def random_transform(image_shape, seed, augmentation=None):
    """ImageDataGenerator's own random parameters for one image, reproducible from `seed`."""
    with sampling_lock:
        return augmentation_generator(augmentation).get_random_transform(image_shape, seed=seed)


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


def apply_transform(image, parameters, augmentation=None):
    """Apply ImageDataGenerator parameters with OpenCV, bilinear, filling the edges as `augmentation` (default
    AUGMENTATION) says: its fill_mode, and cval on ImageDataGenerator's 0-255 scale for "constant"."""
    augmentation = AUGMENTATION if augmentation is None else augmentation
    height, width = image.shape[:2]
    full_scale = np.iinfo(image.dtype).max if image.dtype.kind in "ui" else 255.0
    image = cv2.warpAffine(
        image,
        affine_matrix(parameters, height, width),
        (width, height),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=BORDER_MODES[augmentation.get("fill_mode", "nearest")],
        borderValue=[float(augmentation.get("cval", 0.0)) * full_scale / 255.0] * 4,
    )
    if parameters.get("flip_horizontal"):
        image = image[:, ::-1]
    return image[::-1] if parameters.get("flip_vertical") else image


# == 7. training =======================================================================================================

IMAGENET_WEIGHTS_FILE = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
IMAGENET_WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/resnet/" + IMAGENET_WEIGHTS_FILE
IMAGENET_WEIGHTS_MD5 = "4d473c1dd8becc155b73f8504c6f6626"  # As keras.applications checks it.


def resolve_weights(choice):
    """(what ResNet50 should load, a sentence saying where it comes from) for --weights."""
    if choice.lower() == "none":
        return None, "none (random initialisation)"
    if choice.lower() == "imagenet":
        local = find_local_imagenet_weights()
        return (str(local), f"ImageNet, local copy {local}") if local else download_imagenet_weights()
    path = Path(choice).expanduser()
    if not path.is_file():
        problem = "is a folder, not a weights file" if path.is_dir() else "file not found"
        raise InputError(f"--weights {choice}: {problem}. Pass imagenet, none, or a path to a weights file.")
    import h5py  # A TensorFlow dependency; Keras reads .h5 weights with it.

    if not h5py.is_hdf5(path):  # Checked now, before anything is written, not when the first fold builds its model.
        raise InputError(f"--weights {choice}: not an HDF5 weights file (.h5), as ResNet50's notop weights are.")
    return str(path), f"file {path}"


def find_local_imagenet_weights():
    """A local copy of the ImageNet notop weights: the Keras cache, or any dataset under /kaggle/input."""
    keras_home = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))
    candidates = [keras_home / "models" / IMAGENET_WEIGHTS_FILE, *kaggle_input_files(IMAGENET_WEIGHTS_FILE, depth=4)]
    return next((path for path in candidates if path.is_file()), None)


def download_imagenet_weights():
    """Fetch the ImageNet weights into the Keras cache now, so that without internet the run stops before it
    writes anything."""
    try:
        path = keras.utils.get_file(
            IMAGENET_WEIGHTS_FILE, IMAGENET_WEIGHTS_URL, cache_subdir="models", file_hash=IMAGENET_WEIGHTS_MD5
        )
    except Exception as error:  # Keras reports a failed download as a plain Exception.
        raise InputError(
            f"--weights imagenet: could not download {IMAGENET_WEIGHTS_FILE} ({error}). Pass --weights PATH to a "
            "local copy (on Kaggle, attach it as a dataset), or --weights none to start from random weights."
        ) from None
    return path, f"ImageNet, downloaded to {path}"


def is_from_scratch(settings):
    """--weights none: nothing pretrained, so nothing to freeze."""
    return settings.weights.lower() == "none"


def resnet50_base(image_size, weights, from_scratch):
    """ResNet50 without its top, from `weights` (resolve_weights), or from scratch with its residual blocks starting
    as the identity."""
    try:
        base = keras.applications.ResNet50(include_top=False, weights=weights, input_shape=(image_size, image_size, 3))
    except Exception as error:  # A failed download or an incompatible file: both are the user's to fix.
        raise InputError(
            f"Could not load ResNet50 weights '{weights}' ({error}). Pass --weights PATH to a local "
            f"{IMAGENET_WEIGHTS_FILE}, or --weights none to start from random weights."
        ) from None
    if from_scratch:
        start_residual_blocks_as_identity(base)
    return base


def start_residual_blocks_as_identity(base):
    """From scratch: zero the scale of the last BatchNormalization in each of ResNet50's 16 residual branches.

    Each block then starts as its shortcut, so the random network is in effect a shallow one (stem and projection
    shortcuts) that learns fast, and each branch joins in as its gradient grows (Goyal et al. 2017, "zero gamma").
    Keras' ResNet50 starts every scale at one: on the shipped sample, 8 epochs at 64 px then learned nothing
    (validation weighted log loss 1.06 against the constant's 1.08), and with the zeroed scales 0.65.
    """
    for layer in base.layers:
        if isinstance(layer, layers.BatchNormalization) and layer.name.endswith("_3_bn"):  # conv{N}_block{M}_3_bn
            layer.gamma.assign(keras.ops.zeros_like(layer.gamma))


def load_saved_model(path, severity=True):
    """A saved .keras model, loaded in safe mode so that a model file cannot run arbitrary code; with severity, it
    must map RGB images to class probabilities."""
    try:
        model = keras.models.load_model(path, safe_mode=True)
    except Exception as error:
        reason = (str(error).strip().splitlines() or [""])[0][:300]  # Keras' texts run to many lines.
        raise InputError(f"--model {path}: not a usable Keras model ({type(error).__name__}: {reason}).") from None
    input_shape, output_shape = model.input_shape, model.output_shape
    if severity and not (len(input_shape) == 4 and input_shape[-1] == 3 and output_shape[1:] == (len(CLASS_NAMES),)):
        raise InputError(
            f"--model {path}: maps {input_shape} to {output_shape}, but a severity model maps RGB images "
            f"(None, size, size, 3) to {len(CLASS_NAMES)} class probabilities. Pass a model this script trained."
        )
    return model


def predict_in_batches(model, images, batch_size):
    """Each of the model's outputs (a list, one array per output) for `images`, `batch_size` at a time. Under XLA
    (Keras' default for a model on a GPU), which compiles a program for each batch size, the last batch is padded to a
    whole one; elsewhere it is not: the predict function is traced for any batch size after its second
    (reduce_retracing), and padding is work for nothing (at 16 slices a call, half the localiser's were blank: a
    test study took 2.2 s instead of 1.8, benchmarks/README.md)."""
    pad = bool(model.jit_compile)
    outputs = []
    for start in range(0, len(images), batch_size):
        chunk = batch = images[start : start + batch_size]
        if pad and len(chunk) < batch_size:
            batch = np.zeros((batch_size, *chunk.shape[1:]), chunk.dtype)
            batch[: len(chunk)] = chunk
        result = model.predict_on_batch(batch)
        results = result if isinstance(result, (list, tuple)) else [result]
        outputs.append([np.asarray(each)[: len(chunk)] for each in results])
    return [np.concatenate(parts) for parts in zip(*outputs)]


# Devices and precision.


def tpu_present():
    """A TPU VM exposes /dev/accel*; older TPU nodes announce themselves in TPU_NAME."""
    return bool(os.environ.get("TPU_NAME")) or any(Path("/dev").glob("accel*"))


def cluster_in_tf_config():
    """True when TF_CONFIG names a multi-worker cluster."""
    try:
        return bool(json.loads(os.environ.get("TF_CONFIG") or "{}").get("cluster"))
    except (json.JSONDecodeError, AttributeError):
        raise InputError('TF_CONFIG is not a JSON object like {"cluster": {...}, "task": {...}}.') from None


def choose_strategy(name):
    """The tf.distribute strategy for --strategy. auto: several GPUs → mirrored, a TF_CONFIG cluster →
    multiworker, else the default (one device). A TPU is never chosen: see the error below."""
    if name == "tpu" or (name == "auto" and tpu_present()):
        message = (
            "this pipeline reads and augments images in Python (OpenCV), which cannot feed a TPU's "
            "in-graph input pipeline"
        )
        if name == "tpu":
            raise InputError(
                f"--strategy tpu: {message}. Train on GPUs (Kaggle's T4 x2 uses --strategy mirrored) or the CPU."
            )
        print(f"strategy: a TPU is present, but {message}; training on the host instead.")
    if name == "auto":
        name = (
            "mirrored"
            if len(tf.config.list_physical_devices("GPU")) > 1
            else "multiworker"
            if cluster_in_tf_config()
            else "default"
        )
    if name == "mirrored":  # All GPUs; on a machine without any, all (logical) CPU devices.
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([device.name for device in devices])
    if name == "multiworker":
        if not cluster_in_tf_config():
            raise InputError("--strategy multiworker needs TF_CONFIG to name the cluster and this worker's task.")
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def initialise_devices():
    """Find the devices once, quietly (import_tensorflow): on a machine without a GPU, TensorFlow's first look prints
    an error line (E0000 ... failed call to cuInit) that only says there is no GPU."""
    with native_stderr_silenced():
        tf.config.list_physical_devices()


def worker_count(strategy):
    """How many processes train together: the chief and the workers of a TF_CONFIG cluster, else 1."""
    resolver = getattr(strategy, "cluster_resolver", None)
    cluster = resolver.cluster_spec().as_dict() if resolver is not None else {}
    return sum(len(tasks) for job, tasks in cluster.items() if job in ("chief", "worker")) or 1


def strategy_name(strategy):
    """The public name: tf.distribute.MultiWorkerMirroredStrategy's class is called CollectiveAllReduceStrategy."""
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return "MultiWorkerMirroredStrategy"
    return type(strategy).__name__.lstrip("_")  # The default strategy's class is private.


# -- Keras workarounds for multi-worker training -------------------------------------------------------------------
# keras-team/keras#20585 and tensorflow/tensorflow#72388, both open with Keras 3.15 / TF 2.21. Delete this block and
# its one call in train_fold once a release fixes both: tests/test_distribute.py's two-worker run then trains
# without it.
def allow_multi_worker_training(model):
    """Work around two Keras 3 bugs that stop MultiWorkerMirroredStrategy training; only for several workers.

    1. fit() first averages one batch over the workers with strategy.reduce on a tuple, which this strategy
       cannot do (keras-team/keras#20585). A built model without its own strategy skips that step and uses the
       strategy in scope.
    2. Each step's metrics are averaged over the workers along axis 0, which fails on scalars
       (tensorflow/tensorflow#72388). They are already in sync across replicas, so the first replica's copy is
       the value, as Keras itself does on TPUs.
    """
    from keras.src.backend.tensorflow import trainer

    model._distribute_strategy = None
    if not getattr(trainer.reduce_per_replica, "takes_first_across_workers", False):
        reduce_per_replica = trainer.reduce_per_replica

        def reduce_in_sync(values, strategy, reduction):
            if reduction == "auto" and strategy.extended._in_multi_worker_mode():
                reduction = "first"
            return reduce_per_replica(values, strategy, reduction)

        reduce_in_sync.takes_first_across_workers = True
        trainer.reduce_per_replica = reduce_in_sync


# -- end of the multi-worker workarounds --------------------------------------------------------------------------


def is_chief(strategy):
    """Only the chief writes the artifacts: the task called chief, else worker 0, else the only process."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or resolver.task_type in (None, "chief"):
        return True
    return resolver.task_type == "worker" and resolver.task_id == 0 and "chief" not in resolver.cluster_spec().as_dict()


def choose_precision(precision):
    """Set Keras' dtype policy for --precision (see PRECISIONS); returns its name. The softmax stays float32."""
    policy, _ = precision_policy(precision)
    keras.mixed_precision.set_global_policy(policy)
    return policy


# float16 pays only on GPUs with tensor cores: compute capability 7.0 (Volta) or higher, such as Kaggle's T4. On a
# P100 (6.0) it runs slower than float32.
TENSOR_CORE_CAPABILITY = (7, 0)


def precision_policy(precision):
    """(Keras dtype policy, why) for --precision.

    auto means mixed_float16 only when every GPU has tensor cores, float32 elsewhere. On the CPU it stays float32:
    bfloat16 trained about 1.4× faster on this project's BF16-capable CPU (benchmarks/README.md), but its effect on
    the metric is unmeasured, and CPUs without BF16 instructions run it slower, so there it is an explicit choice."""
    gpus = tf.config.list_physical_devices("GPU")
    if precision == "float32":
        return "float32", "as asked"
    if precision == "mixed":
        return ("mixed_float16", "as asked") if gpus else ("mixed_bfloat16", "as asked; no GPU, so bfloat16")
    if not gpus:
        return "float32", "auto: no GPU"
    capabilities = [tf.config.experimental.get_device_details(gpu).get("compute_capability") for gpu in gpus]
    if all(capability and tuple(capability) >= TENSOR_CORE_CAPABILITY for capability in capabilities):
        return "mixed_float16", f"auto: GPU compute capability {capabilities[0]} has tensor cores"
    return "float32", (
        f"auto: GPU compute capability {capabilities[0]} has no tensor cores (below 7.0, e.g. a P100), where float16 "
        "runs slower; --precision mixed forces it"
    )


# A run keeps its resumable state in OUTPUT_DIR/.resume/: options.json (what must match to resume), localiser/ for
# the level localiser and fold{k}/ for each severity fold. Each holds state.json (Progress), the best weights, a
# backup of the model and its optimizer after the last finished epoch (like Keras' BackupAndRestore, but crash-safe)
# and, once done, what the model left for the run (a fold's predictions.npz; the localiser's report). A finished run
# deletes it; --resume continues from it after a crash, SIGKILL or Ctrl-C.
RUN_OPTIONS = ("data_dir", "val_fraction", "folds", "seed")  # Beside the models' settings, must match to resume.


@dataclass
class Progress:
    """One model's resumable progress (a severity fold's, or the localiser's), saved in its folder's state.json after
    every epoch."""

    fold_dir: Path
    finished_phases: list = field(default_factory=list)
    history: list = field(default_factory=list)  # One row per finished epoch: phase, epoch and the logs.
    best_val_loss: float | None = None
    best_file: str | None = None  # The best epoch's weights (without validation: the latest epoch's).
    averaged_file: str | None = None  # The mean of the weights of the epochs averaged so far (the localiser's).
    averaged_epochs: int = 0
    backup_file: str | None = None  # The model and optimizer after the last finished epoch of an unfinished phase.
    backup_epoch: int | None = None
    done: bool = False  # Trained, and what it leaves for the run saved.
    report: dict = field(default_factory=dict)  # The localiser's validation metrics, once done.

    @classmethod
    def load(cls, fold_dir):
        """The saved progress in fold_dir, or a fresh start (creating the folder)."""
        path = fold_dir / "state.json"
        if path.is_file():
            return cls(fold_dir, **json.loads(path.read_text()))
        fold_dir.mkdir(parents=True, exist_ok=True)
        return cls(fold_dir)

    def save(self):
        """Write state.json atomically: the one file that says which of the others are current."""
        write_json({name: value for name, value in asdict(self).items() if name != "fold_dir"}, self.path("state.json"))

    def path(self, name):
        return self.fold_dir / name


def resume_record(options, settings):
    """What a run records in .resume/options.json, and what --resume must find the same: the settings of each model
    it trains and the options that choose the data and its split, as JSON would read them back."""
    record = {name: str(getattr(options, name)) for name in RUN_OPTIONS}
    for model_settings in settings:
        record |= model_settings.recorded()
    return json.loads(json.dumps(record))


def open_run_state(resume_dir, options, settings):
    """Start a run's resumable state, or check that --resume continues a run with the same settings (those of each
    model in `settings`). Returns True when an interrupted run goes on."""
    current = resume_record(options, settings)
    recorded = resume_dir / "options.json"
    if options.resume and recorded.is_file():
        previous = json.loads(recorded.read_text())
        changed = [
            f"{setting_name(name)} was {previous.get(name)}, now {current[name]}"
            for name in current
            if previous.get(name) != current[name]
        ]
        if changed:
            raise InputError(
                f"--resume: the interrupted run in {resume_dir.parent} used other settings "
                f"({'; '.join(changed)}). Resume with the same ones, or drop --resume."
            )
        return True
    if options.resume:
        print(f"--resume: no interrupted run in {resume_dir.parent}; starting afresh.")
    elif resume_dir.exists():
        print(f"note: discarding an interrupted run's state in {resume_dir} (pass --resume to continue it).")
    shutil.rmtree(resume_dir, ignore_errors=True)
    remove_earlier_outputs(resume_dir.parent)  # A new run: nothing of an earlier one may mix with its outputs.
    resume_dir.mkdir(parents=True)
    write_json(current, recorded)
    return False


def resume_position(resume_dir, settings, fold_count, localiser=False):
    """Where a resumed run goes on, as "fold F, phase P, epoch E" (epochs counted from 1), or "the localiser, epoch E"
    when the run trains one that is not finished, from the saved states."""
    if localiser:
        if not (resume_dir / "localiser" / "state.json").is_file():
            return "the localiser, epoch 1"
        state = Progress.load(resume_dir / "localiser")
        if 1 in state.finished_phases and not state.done:
            return "the localiser, after its training (saving and measuring it)"
        if not state.done:
            return f"the localiser, epoch {(state.backup_epoch or 0) + 1}"
    for fold in range(1, fold_count + 1):
        if not (resume_dir / f"fold{fold}" / "state.json").is_file():
            return f"fold {fold}, phase 1, epoch 1"
        state = Progress.load(resume_dir / f"fold{fold}")
        if state.done:
            continue
        for phase, first_epoch, _, _ in training_phases(settings):
            if phase not in state.finished_phases:
                return f"fold {fold}, phase {phase}, epoch {(state.backup_epoch or first_epoch) + 1}"
        return f"fold {fold}, after its training (predicting)"
    return "the end: every fold is finished, so only the outputs are written"


def setting_name(name):
    """How a user sets a recorded setting: its option (--fine-tune-lr), or the config block (AUGMENTATION)."""
    options = {action.dest for action in build_parser("train")._actions}
    return "--" + name.replace("_", "-") if name in options else name.upper()


interrupt_requested = threading.Event()


def stop_at_batch_end_on_interrupt(signal_number, frame):
    """SIGINT handler: training stops at the end of the current batch; a second Ctrl-C stops at once."""
    if interrupt_requested.is_set():
        raise KeyboardInterrupt
    interrupt_requested.set()
    print("\ninterrupted: stopping at the end of this batch (Ctrl-C again to stop at once)", flush=True)


def learning_rate_schedule(learning_rate, steps_per_epoch, epochs, final_share):
    """A phase's learning rate: warmed up linearly over its first epoch (at most a quarter of the phase), then
    cosine-decayed to final_share of it (1: constant).

    Adam's first steps move every weight by the full learning rate whatever its gradient's size; on the severity
    head's 8,192+ Flatten inputs, which all have the same sign, that shifts a unit's input by several times its spread
    per step and switches most ReLUs off for good. Warming up gives Adam's moment estimates time to settle.
    """
    steps = steps_per_epoch * epochs
    warmup = max(1, min(steps_per_epoch, steps // 4))
    return keras.optimizers.schedules.CosineDecay(
        learning_rate / warmup,
        max(1, steps - warmup),
        alpha=final_share,
        warmup_target=learning_rate,
        warmup_steps=warmup,
    )


def run_phase(model, batches, phase, first_epoch, end_epoch, state, average_from=None):
    """fit() for one phase, resuming after its last finished epoch; names an image that breaks mid-run.

    batches: (training, validation or None, BatchNormalization statistics or None: then the caller recalibrates
    once, at the end). average_from: the first epoch (counted from 1) whose weights go into the phase's mean."""
    train_batches, validation_batches, statistics_batches = batches
    resume_epoch = restore_backup(model, state, phase, first_epoch)
    train_batches.start_epoch(resume_epoch)
    callbacks = [EpochHeader(), SaveProgress(phase, end_epoch, state, average_from), StopOnInterrupt()]
    if statistics_batches is not None and learning_batch_normalizations(model):
        callbacks.insert(0, RecalibrateBatchNormalization(statistics_batches))  # First: before the epoch is saved.
    try:
        model.fit(
            train_batches,
            validation_data=validation_batches,
            initial_epoch=resume_epoch,
            epochs=end_epoch,
            callbacks=callbacks,
            shuffle=False,  # The batches shuffle themselves, from the seed.
            verbose=1 if sys.stdout.isatty() else 2,  # One line per epoch in logs; a progress bar on a terminal.
        )
    except Exception:
        advice = "The run stopped with its state saved: restore the file and run again with --resume, or add "
        failure = decoding_failure(batches, advice + "--skip-bad-images.")
        if failure:
            raise failure from None
        raise


def restore_best_weights(model, state):
    """Load the best epoch's weights (without a validation set, the latest epoch's)."""
    if state.best_file:
        model.set_weights(saved_weights(state.path(state.best_file)))


def saved_weights(path):
    """The weights np.savez saved, in order."""
    with np.load(path) as saved:
        return [saved[f"arr_{index}"] for index in range(len(saved.files))]


def restore_backup(model, state, phase, first_epoch):
    """Continue a phase after its last finished epoch: reload the model and optimizer; returns that epoch."""
    if state.backup_file is None:
        return first_epoch
    model.optimizer.build(model.trainable_variables)  # Its slots must exist before they can be loaded.
    model.load_weights(state.path(state.backup_file))
    print(f"resuming phase {phase} after epoch {state.backup_epoch}")
    return state.backup_epoch


def decoding_failure(batches, advice):
    """The error for an image that passed the up-front check but broke when a batch needed it, or None."""
    failed_path = next((path for batch in batches if (path := getattr(batch, "failed_path", None))), None)
    if failed_path is None:
        return None
    return UnreadableImageError(
        f"{failed_path}: cannot be decoded any more (it passed the check at the start). {advice}"
    )


@functools.cache
def define_training_callbacks():
    """The callbacks of run_phase, as globals: Keras classes, so defined once import_tensorflow has imported Keras."""
    global EpochHeader, RecalibrateBatchNormalization, SaveProgress, StopOnInterrupt

    class EpochHeader(keras.callbacks.Callback):
        """Keras prints "Epoch 2/8" before an epoch only when fit() runs more than one epoch in all; this prints it for
        a fit() of one epoch (--epochs 1), so that every epoch's line in the log has its header."""

        def on_epoch_begin(self, epoch, logs=None):
            if self.params.get("epochs") == 1 and self.params.get("verbose"):
                print(f"Epoch {epoch + 1}/1", flush=True)

    class StopOnInterrupt(keras.callbacks.Callback):
        """Raises KeyboardInterrupt at the end of the batch during which Ctrl-C arrived.

        Raising, rather than setting stop_training, keeps Keras from saving the half-done epoch as finished.
        """

        def on_train_batch_end(self, batch, logs=None):
            if interrupt_requested.is_set():
                raise KeyboardInterrupt

    class SaveProgress(keras.callbacks.Callback):
        """After every epoch, saves what a resumed run needs: the best weights so far (by validation loss; without a
        validation set, the latest), from epoch average_from on the mean of the epochs' weights, the history, and a
        backup of the model and optimizer to continue the phase from; after a phase's last epoch, the mark that it
        is finished instead. Each file gets a new name, and state.json, written last and atomically, says which are
        current: a SIGKILL at any moment leaves a consistent state."""

        def __init__(self, phase, end_epoch, state, average_from=None):
            super().__init__()
            self.phase, self.end_epoch, self.state, self.average_from = phase, end_epoch, state, average_from

        def on_epoch_end(self, epoch, logs=None):
            state = self.state
            superseded = [state.backup_file]
            # Epochs are counted from 1 in history.csv, as in the log ("Epoch 1/5") and the plots.
            logged = {name: float(value) for name, value in (logs or {}).items()}
            row = {"phase": self.phase, "epoch": epoch + 1, **logged}
            state.history = [old for old in state.history if old["epoch"] != epoch + 1] + [row]
            best = state.best_val_loss
            if "val_loss" not in row or row["val_loss"] < (math.inf if best is None else best):  # NaN is never better.
                superseded.append(state.best_file)
                state.best_val_loss, state.best_file = row.get("val_loss"), f"best-epoch{epoch + 1}.npz"
                write_atomically(state.path(state.best_file), lambda path: np.savez(path, *self.model.get_weights()))
            if self.average_from is not None and epoch + 1 >= self.average_from:
                superseded.append(state.averaged_file)
                mean = averaged_weights(self.model.get_weights(), state)
                state.averaged_epochs, state.averaged_file = state.averaged_epochs + 1, f"averaged-epoch{epoch + 1}.npz"
                write_atomically(state.path(state.averaged_file), lambda path: np.savez(path, *mean))
            if epoch + 1 == self.end_epoch:
                state.backup_file = state.backup_epoch = None
                state.finished_phases.append(self.phase)
            else:
                state.backup_file, state.backup_epoch = f"backup-epoch{epoch + 1}.weights.h5", epoch + 1
                write_atomically(state.path(state.backup_file), self.model.save_weights)  # With the optimizer.
            state.save()
            for name in superseded:
                if name and name not in (state.best_file, state.averaged_file, state.backup_file):
                    state.path(name).unlink(missing_ok=True)

    class RecalibrateBatchNormalization(keras.callbacks.Callback):
        """Recalibrates BatchNormalization once per epoch, before validation (or, without any, before the epoch is
        saved), so that validation, the kept weights and the predictions all use the current statistics."""

        def __init__(self, batches):
            super().__init__()
            self.batches = batches
            self.done = False

        def on_epoch_begin(self, epoch, logs=None):
            self.done = False

        def on_test_begin(self, logs=None):
            self.recalibrate()

        def on_epoch_end(self, epoch, logs=None):
            self.recalibrate()

        def recalibrate(self):
            if not self.done:
                recalibrate_batch_normalization(self.model, self.batches)
                self.done = True


def averaged_weights(weights, state):
    """The running mean of the weights of the epochs averaged so far (state.averaged_file) and this epoch's."""
    if not state.averaged_file:
        return weights
    count = state.averaged_epochs
    return [
        mean + (new - mean) / (count + 1) for mean, new in zip(saved_weights(state.path(state.averaged_file)), weights)
    ]


def learning_batch_normalizations(model):
    """The BatchNormalization layers, nested ones included, that normalise with batch statistics in training."""
    found = []
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization) and layer.trainable:
            found.append(layer)
        elif hasattr(layer, "layers"):
            found += learning_batch_normalizations(layer)
    return found


STATISTICS_PASSES = weakref.WeakKeyDictionary()  # {model: its statistics_pass}, while the model lives.


def statistics_pass(model):
    """The model run in training mode, as one tf.function traced once per model (eager ResNet50 steps are slow): for
    any batch size, so that a short last batch does not trace the network a second time, and without AutoGraph, which
    has nothing to convert here."""
    if model not in STATISTICS_PASSES:
        live = weakref.ref(model)  # The traced function must not keep its model alive.
        images = tf.TensorSpec((None, *model.input_shape[1:]), tf.float32)
        STATISTICS_PASSES[model] = tf.function(
            lambda images: live()(images, training=True), input_signature=[images], autograph=False
        )
    return STATISTICS_PASSES[model]


def recalibrate_batch_normalization(model, batches):
    """Set each learning BatchNormalization layer's moving statistics to its mean batch statistics over `batches`.

    Inference uses moving averages (momentum 0.99) that, in a short run, still remember the random start and the
    early weights: the model then predicts from statistics its layers no longer produce (a from-scratch run
    predicted one class for every validation image). This pass ("precise BatchNorm") runs the current network in
    training mode over unaugmented training images and stores the average of each layer's batch mean and variance,
    so inference normalises as training did, now. Frozen layers (a pretrained base) keep their statistics.
    """
    normalizations = learning_batch_normalizations(model)
    momentums = [layer.momentum for layer in normalizations]
    totals = [np.zeros((2, *layer.moving_mean.shape)) for layer in normalizations]
    try:
        for layer in normalizations:
            layer.momentum = 0.0  # Each pass then leaves exactly its own batch's statistics in the layer.
        for index in range(len(batches)):
            statistics_pass(model)(batches[index][0])
            for total, layer in zip(totals, normalizations):
                total += (layer.moving_mean.numpy(), layer.moving_variance.numpy())
        for total, layer in zip(totals, normalizations):
            layer.moving_mean.assign(total[0] / len(batches))
            layer.moving_variance.assign(total[1] / len(batches))
    finally:
        for layer, momentum in zip(normalizations, momentums):
            layer.momentum = momentum


def is_fresh_keras_function_note(record):
    """True for TensorFlow's "N out of the last M calls to ...multi_step_on_iterator triggered tf.function retracing".

    That note counts traces by the traced function's code, and Keras builds its train and test functions anew from
    one code object at every compile: two per phase, so four per fold, each traced exactly once. With only a few
    steps per epoch (small data, --folds 2) the note then fires, though nothing was traced twice. The real retraces
    it hid, of the precise-BatchNorm pass and of prediction on a short last batch, are gone (one trace per model:
    recalibrate_batch_normalization, ImageBatches' full_batches); a retrace of any other function still shows."""
    message = record.getMessage()
    return "triggered tf.function retracing" in message and "multi_step_on_iterator" in message


def keep_tensorflow_record(record):
    """The filter on TensorFlow's logger that drops is_fresh_keras_function_note's false alarm (import_tensorflow
    adds it)."""
    return not is_fresh_keras_function_note(record)


# How long a run will take, said before it starts: the images each model trains on, times a training step's cost per
# image measured here on ResNet50 at each model's input size, plus decoding every DICOM a few times. Runs too small to
# matter (fewer image-steps than ESTIMATE_FROM_IMAGE_STEPS) are not measured. It is an estimate within perhaps a
# factor of 1.5: the localiser's pyramid, the frozen base of phase 1 and the input pipeline are not in it.
ESTIMATE_FROM_IMAGE_STEPS = 20_000
KAGGLE_HOURS = 9  # a Kaggle notebook's limit
# A localiser step per slice against plain ResNet50's per image at its size: its pyramid, heatmap head and warps
# (0.098-0.115 s a slice in benchmarks/localiser.py against the probe's 0.042 s at 128 px, 2 cores, 2026-12-04).
LOCALISER_STEP_COST = 2.5
DICOM_READS_PER_FILE = 1.1  # one pass over every file; the slices of the crops at found points once more


def print_time_estimate(settings, localiser, row_ids, options, competition):
    """One line before a long run reads or trains anything: about how long it takes on this machine, by stage; and,
    beyond Kaggle's limit, what to change. row_ids: the labelled rows it will split into training and validation
    (from the competition's train.csv, before its crops are cut); `localiser`: its settings, or None."""
    # The share of the rows each epoch trains on, summed over the folds: one fold holds out --val-fraction; K folds
    # each hold out 1/K.
    folds = options.folds
    share = (1.0 - options.val_fraction) if folds == 1 else folds - 1.0
    severity_images = round(len(row_ids) * share) * (settings.epochs + settings.fine_tune_epochs)
    localiser_images = 0
    if localiser is not None:  # It trains on the first fold's training studies.
        studies = round(len(set(study_ids(row_ids))) * share / folds)
        per_epoch = max(3 * studies * localiser.localiser_slices_per_study, localiser.localiser_min_slices_per_epoch)
        localiser_images = localiser.localiser_epochs * per_epoch
    if severity_images + localiser_images < ESTIMATE_FROM_IMAGE_STEPS:
        return None
    hours = {
        "reading the DICOMs": reading_seconds(competition) / options.workers / 3600 if competition else 0.0,
        "localiser": localiser_images * LOCALISER_STEP_COST * seconds_per_slice(localiser) / 3600,
        "severity model": severity_images * training_seconds_per_image(settings.image_size) / 3600,
    }
    total = sum(hours.values())
    stages = ", ".join(f"{name} {value:.1f} h" for name, value in hours.items() if value)
    line = f"estimate: about {total:.1f} h on this machine ({stages}), from a quick measurement"
    if total > KAGGLE_HOURS:
        on_cpu = "" if tf.config.list_logical_devices("GPU") else " on this CPU"
        line += (
            f"; beyond a Kaggle notebook's {KAGGLE_HOURS}-hour limit{on_cpu}. Train on a GPU, or lower --epochs, "
            "--fine-tune-epochs, --localiser-epochs or --image-size (each scales its stage)"
        )
    print(line)
    return total


def seconds_per_slice(localiser):
    """The probe's seconds per image at the localiser's input size; 0 without a localiser."""
    return training_seconds_per_image(localiser.localiser_image_size) if localiser else 0.0


def training_seconds_per_image(image_size, batch=8):
    """Seconds per image of a training step of ResNet50 at image_size on this machine's default device: two steps
    timed after one that builds and traces it."""
    network = keras.applications.ResNet50(
        include_top=False, weights=None, input_shape=(image_size, image_size, 3), pooling="avg"
    )
    network.compile(optimizer="adam", loss="mse")
    images = np.random.default_rng(0).random((batch, image_size, image_size, 3), np.float32)
    targets = np.zeros((batch, network.output_shape[-1]), np.float32)
    network.train_on_batch(images, targets)
    started = time.perf_counter()
    for _ in range(2):
        network.train_on_batch(images, targets)
    seconds = (time.perf_counter() - started) / (2 * batch)
    keras.backend.clear_session()
    return seconds


def reading_seconds(competition, sample=8):
    """Seconds for one worker to read the competition's DICOMs DICOM_READS_PER_FILE times: a few files decoded and
    timed, times their number."""
    paths = sorted((competition / "train_images").glob("*/*/*.dcm")) + sorted(
        (competition / "test_images").glob("*/*/*.dcm")
    )
    if not paths:
        return 0.0
    chosen = paths[:: max(1, len(paths) // sample)][:sample]
    started = time.perf_counter()
    read_slice_files(dict(enumerate(chosen)))
    return (time.perf_counter() - started) / len(chosen) * len(paths) * DICOM_READS_PER_FILE


# == 8. the level localiser ============================================================================================


def localiser_for_run(competition, table, validation_rows, settings, options, output_dir):
    """The run's level localiser, trained on the training studies of the severity split and measured on its
    validation studies, or the one an interrupted run finished; saved as OUTPUT/localiser.keras. Returns (the
    Localiser, its LocaliserReport), or (None, None) when it trains none (--localiser-epochs 0, or no study with a
    labelled series it can read): then the test rows get their best constants, and the run says so."""
    prepared = options.data_dir
    if settings is None:
        print("warning: --localiser-epochs 0: no level localiser, so every test row gets its location's best constant.")
        return None, None
    progress, path = Progress.load(output_dir / ".resume" / "localiser"), output_dir / "localiser.keras"
    validation_points = prepared / "validation_coordinates.csv"
    if progress.done and path.is_file():
        print(f"localiser: finished before the interruption, so {path} is used as it is")
        report_points = validation_points if validation_points.is_file() else None
        cache = split_slice_cache(competition, output_dir, "train", settings.localiser_image_size)
        return Localiser.load(path), LocaliserReport(progress.report, competition, prepared, report_points, cache)
    coordinates = read_coordinates(competition / "train_label_coordinates.csv")
    validation = set(study_ids(table["row_id"].iloc[validation_rows]))
    labelled = sorted(set(coordinates["study_id"]))
    cache_dir, size = slice_cache(output_dir, "train"), settings.localiser_image_size

    def read(studies):
        return read_localiser_studies(competition, "train", studies, size, coordinates, options.workers, cache_dir)

    training_ids = [study for study in labelled if study not in validation]
    training = read(training_ids)
    count_unused_labels(coordinates, training_ids, training)
    if not training:
        print(
            f"warning: localiser: no training study in {competition} has a labelled series it can read (Sagittal T1, "
            "Sagittal T2/STIR or Axial T2 slices with their position and orientation tags), so none is trained "
            "and every test row gets its location's best constant."
        )
        return None, None
    keras.utils.set_random_seed(options.seed)
    model = fit_localiser(training, settings, options, progress)
    steps = learn_level_steps(training)
    localiser = Localiser(model, learn_offsets(training), steps, learn_step_ranges(training, steps))
    localiser.save(path)
    metrics, report_points = {}, None
    held_out = read(sorted(validation)) if validation else []
    if held_out:
        chains = {}
        found = localise_studies(localiser, held_out, chains)
        metrics = localisation_metrics(found, held_out, chains)
        print_localisation(metrics, len(held_out))
        save_localisation_plot(found, held_out, output_dir)
        report_points = write_csv(localised_rows(found, mixed=True), validation_points)
    progress.done, progress.report = True, metrics
    progress.save()
    cache = split_slice_cache(competition, output_dir, "train", size)
    return localiser, LocaliserReport(metrics, competition, prepared, report_points, cache)


def count_unused_labels(coordinates, wanted_studies, studies):
    """Print how many of the wanted studies' label points the localiser trains on, and name those it cannot use
    (on a series it does not read, an instance it lacks, or a study without a readable series)."""
    wanted = coordinates[coordinates["study_id"].isin(set(wanted_studies))]
    read = {study.study_id for study in studies}
    unused = [entry for study in studies for entry in study.unused_labels]
    unused += [
        f"{row_id} (study {study_id}: no listed series that the localiser can read)"
        for row_id, study_id in wanted.loc[~wanted["study_id"].isin(read), ["row_id", "study_id"]].itertuples(False)
    ]
    print(
        f"localiser: trains on {len(wanted) - len(unused):,} of the {len(wanted):,} label points of its studies"
        + (f"; {len(unused):,} cannot be used: {list_some(unused, limit=5)}" if unused else "")
    )


@dataclass
class LocaliserReport:
    """What training the localiser leaves for the run's report."""

    metrics: dict  # localisation_metrics on the validation studies
    competition_dir: Path
    prepared: Path
    validation_points: Path | None  # The points it found in the validation studies, as coordinates.
    slice_cache: SliceCache | None = None  # The training studies' slices, and so their stacks.


# The localiser's output channels: one per canal level, one per foramen level (either side; the slice says which),
# and one per side for the recess on an axial slice (its level comes from the geometry).
LOCALISER_CHANNELS = (
    *[("spinal_canal_stenosis", level) for level in LEVELS],
    *[("neural_foraminal_narrowing", level) for level in LEVELS],
    ("left_subarticular_stenosis", None),
    ("right_subarticular_stenosis", None),
)
KIND_CHANNELS = {"canal": range(0, 5), "foramen": range(5, 10), "recess": range(10, 12)}
# The conditions whose five levels are decoded as a chain, one point per level on a sagittal series.
CHAIN_CONDITIONS = ("spinal_canal_stenosis", "left_neural_foraminal_narrowing", "right_neural_foraminal_narrowing")
# The localiser's training targets, per slice and channel (slice_targets): these fields, in this order; x and y are
# normalised to [0, 1] across the slice.
TARGET_FIELDS = ("x", "y", "coordinate_mask", "presence", "presence_mask")
X, Y, COORDINATE_MASK, PRESENCE, PRESENCE_MASK = range(len(TARGET_FIELDS))


def level_channels(condition):
    """{level: its localiser output channel} for a condition decoded as a chain (CHAIN_CONDITIONS)."""
    return dict(zip(LEVELS, KIND_CHANNELS[CONDITION_KIND[condition]]))


def to_unit(x, y, shape):
    """A point in the pixels of an image of shape (rows, columns) as the localiser's normalised (x, y): the image's
    edges at 0 and 1, so pixel centres sit at (i + 0.5) / n, whatever the image's size."""
    return (x + 0.5) / shape[1], (y + 0.5) / shape[0]


def from_unit(x, y, shape):
    """A normalised (x, y) (to_unit) in the pixels of an image of shape (rows, columns)."""
    return x * shape[1] - 0.5, y * shape[0] - 0.5


def resized_pixel(shape, resized_shape, x, y):
    """A pixel (x, y) of an image of `shape`, in that image resized to `resized_shape`."""
    return from_unit(*to_unit(x, y, shape), resized_shape)


@dataclass
class LocaliserStudy:
    """One study as the localiser sees it: every stack of every series of each kind, and its label points."""

    study_id: str
    volumes: dict  # kind → [Volume, ...], the largest stack first.
    points: dict = field(default_factory=dict)  # (condition, level) → world point; only for labelled studies.
    labels: dict = field(default_factory=dict)  # (condition, level) → (volume, index) of the labelled slice.
    unused_labels: list = field(default_factory=list)  # "row_id (series/instance: why)" of labels it cannot place.


def read_localiser_studies(
    competition_dir, split, study_ids, image_size, coordinates=None, workers=WORKERS, cache_dir=None
):
    """The localiser's view of some studies of a split, read on a thread pool; studies without any series it reads
    are left out. With a slice cache (cache_dir), the studies it lacks are first decoded into it by `workers`
    processes (decoding_pool), then every study is read back from it, memory-mapped."""
    series = study_series(read_series_descriptions(competition_dir, split))
    study_ids = [study_id for study_id in study_ids if study_id in series]
    by_study = dict(tuple(coordinates.groupby("study_id"))) if coordinates is not None else {}
    images_dir = competition_dir / f"{split}_images"
    if cache_dir is not None:
        with decoding_pool(workers) as pool:
            futures = [
                pool.submit(cache_volumes, images_dir, study_id, series[study_id], image_size, cache_dir)
                for study_id in study_ids
            ]
            for future in futures:
                result_of_worker(future, futures, [str(images_dir / study_id) for study_id in study_ids])

    def read(study_id):
        labels = by_study.get(study_id, coordinates.iloc[:0]) if coordinates is not None else None
        return read_localiser_study(images_dir, study_id, series[study_id], image_size, labels, cache_dir)

    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as executor:
        return [study for study in executor.map(read, study_ids) if study.volumes]


def read_localiser_study(images_dir, study_id, series_by_kind, image_size, coordinates=None, cache_dir=None):
    """Read a study's series for the localiser (through the slice cache in cache_dir, when one is given); with
    coordinates (its label rows), place its points in the world."""
    study = LocaliserStudy(study_id, study_volumes(images_dir, study_id, series_by_kind, image_size, cache_dir))
    if coordinates is not None:
        place_labels(study, coordinates, {series_id for ids in series_by_kind.values() for series_id in ids})
    return study


def place_labels(study, coordinates, listed_series):
    """Put each label row's point in the world from its slice, on whichever stack of whichever series holds it; the
    rows that no slice holds are kept in study.unused_labels, with the reason."""
    slices = {
        (volume.stack.series_id, header.instance_number): (volume, index)
        for kind_volumes in study.volumes.values()
        for volume in kind_volumes
        for index, header in enumerate(volume.stack.slices)
    }
    for row in coordinates.itertuples(index=False):
        found = slices.get((row.series_id, int(row.instance_number)))
        if found is None:
            why = (
                "a series the series descriptions do not list as Sagittal T1, Sagittal T2/STIR or Axial T2"
                if row.series_id not in listed_series
                else "an instance that is missing or has no position tags"
            )
            study.unused_labels.append(f"{row.row_id} ({row.series_id}/{int(row.instance_number)}: {why})")
            continue
        key = condition_and_level(row.row_id)
        study.points[key] = found[0].stack.pixel_to_world(found[1], row.x, row.y)
        study.labels[key] = found


def condition_and_level(row_id):
    """(condition, level) of a competition row_id "{study_id}_{condition}_{level}"; levels hold one "_" too."""
    location = row_id.split("_", 1)[1]
    return location[: -len("_l1_l2")], location[-len("l1_l2") :]


def channel_candidates(study, channel):
    """The labelled world points a channel may stand for: a canal or foramen level's (both sides), or one side's
    recess at every level."""
    condition, level = LOCALISER_CHANNELS[channel]
    if condition == "neural_foraminal_narrowing":
        keys = [(f"{side}_{condition}", level) for side in ("left", "right")]
    elif level is None:
        keys = [(condition, each) for each in LEVELS]
    else:
        keys = [(condition, level)]
    return [study.points[key] for key in keys if key in study.points]


def slice_targets(study, kind, volume, index):
    """The localiser's targets for one slice: (channels, TARGET_FIELDS).

    A point counts as present on the slice nearest to it (within one slice spacing); its coordinates are taught
    on every slice within 1.5 spacings, where it is still in view.
    """
    targets = np.zeros((len(LOCALISER_CHANNELS), len(TARGET_FIELDS)), np.float32)
    stack = volume.stack
    spacing = abs(stack.slice_spacing) or 3.0
    for channel in KIND_CHANNELS[kind]:
        candidates = channel_candidates(study, channel)
        if not candidates:
            continue  # Unlabelled here: neither its position nor its absence is known.
        distances = [abs(stack.plane_distances(point)[index]) for point in candidates]
        point = candidates[int(np.argmin(distances))]
        x, y, distance = stack.world_to_pixel(point, index)
        nearest = int(np.argmin(np.abs(stack.plane_distances(point))))
        targets[channel, PRESENCE] = float(nearest == index and abs(distance) <= spacing)
        targets[channel, PRESENCE_MASK] = 1.0
        if abs(distance) <= 1.5 * spacing and stack.contains(x, y):
            targets[channel, [X, Y, COORDINATE_MASK]] = (*to_unit(x, y, stack.shape), 1.0)
    return targets


def triplet(volume, index):
    """The localiser's input at slice `index`: that slice and its neighbours along the normal as 3 channels."""
    return np.stack([volume.images[each] for each in neighbour_indices(index, len(volume.images))], -1)


def localiser_input(images):
    """uint8 slice triplets → the ResNet50 input, as the severity model's (caffe-mode preprocess_input)."""
    return keras.applications.resnet50.preprocess_input(np.asarray(images, np.float32))


def vary_intensity(image, rng, intensity):
    """A uint8 slice triplet with its intensities varied as another scanner or sequence would vary them, every
    channel alike: a gamma, a contrast about the mean, a smooth bias field, a blur and noise, each drawn from `rng`
    within the ranges of `intensity` (LOCALISER_INTENSITY_AUGMENTATION). Real MR differs from study to study in all
    of these, and a localiser that has seen one contrast only may not find the levels on another."""
    size = image.shape[0]
    low, high = intensity["gamma"]
    values = (image.astype(np.float32) / 255.0) ** np.exp(rng.uniform(np.log(low), np.log(high)))
    mean = values.mean()
    values = mean + (values - mean) * rng.uniform(*intensity["contrast"])
    field = rng.normal(0.0, intensity["bias_field"], (4, 4)).astype(np.float32)
    values *= np.exp(cv2.resize(field, (size, size), interpolation=cv2.INTER_CUBIC))[..., None]
    sigma = rng.uniform(0.0, intensity["blur"])
    if sigma > 0.3:
        values = cv2.GaussianBlur(values, (0, 0), sigma)
    values += rng.normal(0.0, rng.uniform(0.0, intensity["noise"]), values.shape).astype(np.float32)
    return (np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)


def augment_localiser_sample(image, targets, kind, seed, augmentation):
    """ImageDataGenerator-style affine augmentation that moves the points with the image; an axial slice may also
    be flipped left to right, which swaps the patient's left and right, and so the two recess channels."""
    size = image.shape[0]
    parameters = random_transform(image.shape, seed, augmentation)
    matrix = np.vstack([affine_matrix(parameters, size, size), [0, 0, 1]])
    image = cv2.warpAffine(
        image,
        matrix[:2],
        (size, size),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )
    targets = targets.copy()
    pixels = np.c_[np.transpose(from_unit(targets[:, X], targets[:, Y], (size, size))), np.ones(len(targets))]
    moved = pixels @ np.linalg.inv(matrix).T  # The warp maps output pixels to input ones; points go the other way.
    targets[:, [X, Y]] = np.transpose(to_unit(moved[:, 0], moved[:, 1], (size, size)))
    outside = ((targets[:, [X, Y]] < 0) | (targets[:, [X, Y]] > 1)).any(axis=1)
    targets[outside, COORDINATE_MASK] = 0.0
    if kind == "recess" and np.random.default_rng(seed).random() < 0.5:
        image = image[:, ::-1]
        targets[:, X] = 1.0 - targets[:, X]
        left, right = KIND_CHANNELS["recess"]
        targets[[left, right]] = targets[[right, left]]
    return np.ascontiguousarray(image), targets


@functools.cache
def define_localiser_batches():
    """LocaliserBatches, as a global: a Keras class, so defined once import_tensorflow has imported Keras."""
    global LocaliserBatches

    class LocaliserBatches(keras.utils.PyDataset):
        """Slices for the localiser, as its settings say. For training (augment): each epoch,
        localiser_slices_per_study per study and series kind it has labels for (more where that would give fewer than
        localiser_min_slices_per_epoch slices), shuffled, the slices warped with their points (augment_localiser_sample)
        and, for localiser_intensity_share of them, their intensities varied as scanners and sequences vary them
        (vary_intensity). Otherwise (the BatchNormalization statistics): one slice per study and series kind, as drawn.

        A share of them (localiser_labelled_share) is drawn at or next to a labelled slice and the rest anywhere in the
        stack, so the presence head sees both.
        """

        def __init__(self, studies, settings, seed=0, augment=False, workers=1):
            super().__init__(workers=workers, use_multiprocessing=False, max_queue_size=2 * workers)
            items = [
                (number, kind)
                for number, study in enumerate(studies)
                for kind in study.volumes
                if any(CONDITION_KIND[condition] == kind for condition, _ in study.points)
            ]
            self.studies, self.settings, self.seed, self.augment = studies, settings, seed, augment
            self.batch_size = settings.localiser_batch_size
            # The slices a labelled point is present on, per item: drawn from half the time.
            labelled = [
                [
                    (volume, index)
                    for volume in studies[number].volumes[kind]
                    for index in range(len(volume.images))
                    if slice_targets(studies[number], kind, volume, index)[:, PRESENCE].any()
                ]
                for number, kind in items
            ]
            repeats = 1
            if augment:
                minimum = math.ceil(settings.localiser_min_slices_per_epoch / max(len(items), 1))
                repeats = max(settings.localiser_slices_per_study, minimum)
            self.items, self.labelled = repeats * items, repeats * labelled
            self.start_epoch(0)

        def start_epoch(self, epoch):
            self.epoch = epoch
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.items))
            self.order = order if self.augment else np.arange(len(self.items))

        def __len__(self):
            return math.ceil(len(self.items) / self.batch_size)

        def sample(self, item):
            """One (slice triplet, targets); the slice is drawn from a generator unique to (seed, epoch, item)."""
            number, kind = self.items[item]
            study = self.studies[number]
            rng = np.random.default_rng([self.seed, self.epoch if self.augment else 0, item])
            labelled = self.labelled[item]
            if labelled and rng.random() < self.settings.localiser_labelled_share:
                volume, index = labelled[rng.integers(len(labelled))]
                index = int(np.clip(index + rng.choice([-1, 0, 0, 0, 1]), 0, len(volume.images) - 1))
            else:
                volume = study.volumes[kind][rng.integers(len(study.volumes[kind]))]
                index = int(rng.integers(len(volume.images)))
            image, targets = triplet(volume, index), slice_targets(study, kind, volume, index)
            if self.augment:
                settings, seed = self.settings, int(rng.integers(2**31))
                image, targets = augment_localiser_sample(image, targets, kind, seed, settings.localiser_augmentation)
                if rng.random() < settings.localiser_intensity_share:
                    image = vary_intensity(image, rng, settings.localiser_intensity_augmentation)
            return image, targets

        def __getitem__(self, index):
            samples = [
                self.sample(item) for item in self.order[index * self.batch_size : (index + 1) * self.batch_size]
            ]
            targets = np.stack([targets for _, targets in samples])
            return localiser_input([image for image, _ in samples]), (targets, targets)  # For both of the losses.

        def on_epoch_end(self):
            self.start_epoch(self.epoch + 1)


def flat_heatmaps(heatmaps):
    """Heatmap logits (batch, height, width, channels) → (float32 logits (batch, channels, height × width), the
    x and the y of the cell centres normalised to [0, 1], as pixel centres are)."""
    heatmaps = keras.ops.cast(heatmaps, "float32")
    height, width, channels = heatmaps.shape[1], heatmaps.shape[2], heatmaps.shape[3]
    flat = keras.ops.reshape(keras.ops.transpose(heatmaps, (0, 3, 1, 2)), (-1, channels, height * width))
    xs = (keras.ops.arange(width, dtype="float32") + 0.5) / width
    ys = (keras.ops.arange(height, dtype="float32") + 0.5) / height
    return flat, xs, ys


@functools.cache
def define_localiser_layers():
    """The localiser's own layers, as globals, registered with its losses under the names a saved localiser.keras
    refers to ("rsna_spine>SpatialSoftArgmax"): Keras classes, so defined once import_tensorflow has imported Keras,
    and before any localiser is built or loaded."""
    global PresenceUnderHeatmap, SpatialSoftArgmax
    for loss in (localiser_loss, heatmap_loss):
        keras.saving.register_keras_serializable(package="rsna_spine")(loss)

    @keras.saving.register_keras_serializable(package="rsna_spine")
    class SpatialSoftArgmax(layers.Layer):
        """Heatmap logits (batch, height, width, channels) → each channel's expected (x, y), normalised to [0, 1].

        The expectation under a softmax is differentiable and finer than the grid: a stride-4 heatmap places points to a
        fraction of a cell, where an argmax would be off by up to half a cell. Training takes it over the whole map, so
        every cell learns. Predicting takes it over the cells within `window` of the map's peak: where the map is torn
        between two discs, as it can be at the top of the spine, the whole map's expectation lands between them, and
        the peak's neighbourhood on one of them. (Seed 11's 20 test studies: canal within 10 mm 94.7 → 98.9 %, foramina
        97.9 → 100 %; the submission at the found points 0.482 → 0.388, against 0.329 at the true ones.)
        """

        def __init__(self, window=None, **kwargs):
            super().__init__(**kwargs)
            self.window = window  # cells; None: the whole map, also when predicting

        def get_config(self):
            return {**super().get_config(), "window": self.window}

        def call(self, heatmaps, training=None):
            flat, xs, ys = flat_heatmaps(heatmaps)
            if self.window is not None and not training:
                # Each cell's centre, in the flat order (row by row); float throughout, as the CPU's integer kernels are
                # slow and noisy.
                cell_x = keras.ops.tile(xs, [ys.shape[0]])
                cell_y = keras.ops.repeat(ys, xs.shape[0])
                is_peak = keras.ops.cast(flat >= keras.ops.max(flat, axis=-1, keepdims=True), "float32")
                is_peak = is_peak / keras.ops.sum(is_peak, axis=-1, keepdims=True)  # ties: their middle
                peak_x = keras.ops.sum(is_peak * cell_x, axis=-1, keepdims=True)
                peak_y = keras.ops.sum(is_peak * cell_y, axis=-1, keepdims=True)
                reach_x, reach_y = (self.window + 0.5) / xs.shape[0], (self.window + 0.5) / ys.shape[0]
                near = (keras.ops.abs(cell_x - peak_x) < reach_x) & (keras.ops.abs(cell_y - peak_y) < reach_y)
                flat = keras.ops.where(near, flat, keras.ops.full_like(flat, -1e9))
            weights = keras.ops.reshape(keras.ops.softmax(flat, axis=-1), (-1, flat.shape[1], ys.shape[0], xs.shape[0]))
            x = keras.ops.sum(keras.ops.sum(weights, axis=2) * xs, axis=-1)
            y = keras.ops.sum(keras.ops.sum(weights, axis=3) * ys, axis=-1)
            return keras.ops.stack([x, y], axis=-1)

    @keras.saving.register_keras_serializable(package="rsna_spine")
    class PresenceUnderHeatmap(layers.Layer):
        """(heatmap logits, presence logit maps), both (batch, height, width, channels) → each channel's presence logit
        where its heatmap puts the point: the presence map's mean under the heatmap's softmax.

        Whether a slice is the one nearest to a point is a local question (is the structure at its middle here, or
        already fading to one side?), best answered from the fine features at the point. The heatmap's weights are held
        fixed for this, so the presence loss cannot move the points.
        """

        def call(self, inputs):
            heatmaps, presence_maps = inputs
            weights = keras.ops.stop_gradient(keras.ops.softmax(flat_heatmaps(heatmaps)[0], axis=-1))
            return keras.ops.sum(weights * flat_heatmaps(presence_maps)[0], axis=-1)


# ResNet50 blocks whose outputs feed the localiser's head, at strides 4, 8, 16 and 32.
LOCALISER_FEATURES = ("conv2_block3_out", "conv3_block4_out", "conv4_block6_out", "conv5_block3_out")


def build_localiser(image_size, weights, from_scratch, peak_window=LOCALISER_PEAK_WINDOW, width=LOCALISER_WIDTH):
    """The level localiser: ResNet50, a small feature pyramid down to stride 4, and two heads.

    Output (batch, LOCALISER_CHANNELS, 3): per channel the point's normalised (x, y) on the input slice, by a
    spatial soft-argmax of a stride-4 heatmap, and a logit that the point lies on this slice. The pyramid gives the
    fine heatmap the whole image's context, which it needs to tell one disc level from the next.
    """
    base = resnet50_base(image_size, weights, from_scratch)
    trunk = keras.Model(base.input, [base.get_layer(name).output for name in LOCALISER_FEATURES], name="resnet50")
    inputs = keras.Input(shape=(image_size, image_size, 3), name="slices")
    # Pretrained, the whole trunk learns, its BatchNormalization in inference mode; from scratch, in training mode.
    stride4, stride8, stride16, stride32 = trunk(inputs) if from_scratch else trunk(inputs, training=False)
    pyramid = layers.Conv2D(width, 1)(stride32)
    for features in (stride16, stride8, stride4):
        pyramid = layers.UpSampling2D(2)(pyramid)
        pyramid = layers.Add()([layers.Conv2D(width, 1)(features), pyramid])
    pyramid = layers.Conv2D(width, 3, padding="same", use_bias=False)(pyramid)
    pyramid = layers.Activation("relu")(layers.BatchNormalization()(pyramid))
    heatmaps = layers.Conv2D(len(LOCALISER_CHANNELS), 1, name="heatmaps")(pyramid)
    points = SpatialSoftArgmax(peak_window, name="points")(heatmaps)
    # Presence: the whole slice's view (which levels are in it at all) plus the local view under each point.
    presence = layers.Dense(len(LOCALISER_CHANNELS), dtype="float32")(layers.GlobalAveragePooling2D()(stride32))
    presence_maps = layers.Conv2D(len(LOCALISER_CHANNELS), 1, name="presence_maps")(pyramid)
    presence = layers.Add()([presence, PresenceUnderHeatmap(name="local_presence")([heatmaps, presence_maps])])
    presence = layers.Reshape((len(LOCALISER_CHANNELS), 1))(presence)
    outputs = layers.Concatenate(axis=-1, dtype="float32", name="localiser")([points, presence])
    return keras.Model(inputs, outputs, name="level_localiser")


def masked_mean(values, mask):
    """The mean of values (batch, channels) over the channels that mask keeps, per sample (0 if none)."""
    return keras.ops.sum(values * mask, axis=-1) / keras.ops.maximum(keras.ops.sum(mask, axis=-1), 1.0)


def localiser_loss(targets, outputs):
    """Masked L1 on the coordinates plus masked binary cross-entropy on the presence, per slice.

    targets (batch, channels, TARGET_FIELDS). A channel whose point is not labelled, or lies too far from this slice to
    be seen, is masked out rather than its study dropped.
    """
    targets = keras.ops.cast(targets, "float32")
    error = keras.ops.sum(keras.ops.abs(outputs[..., :2] - targets[..., X : Y + 1]), axis=-1)
    logits, presence = outputs[..., 2], targets[..., PRESENCE]
    cross_entropy = (
        keras.ops.maximum(logits, 0) - logits * presence + keras.ops.log1p(keras.ops.exp(-keras.ops.abs(logits)))
    )
    return LOCALISER_COORDINATE_LOSS_WEIGHT * masked_mean(error, targets[..., COORDINATE_MASK]) + masked_mean(
        cross_entropy, targets[..., PRESENCE_MASK]
    )


def heatmap_loss(targets, heatmaps):
    """Cross-entropy between each labelled channel's softmax over positions and a Gaussian around its point.

    The soft-argmax's L1 loss alone teaches through one expected value per point, whose gradient is weak and spread
    over the whole map while the heatmap is still flat; this dense target tells every cell how near it is, so the
    map sharpens in far fewer steps (on 24 studies, 30 epochs: canal median 9.4 → 5.1 mm, foramina 6.7 → 4.9 mm).
    targets as in localiser_loss; heatmaps (batch, height, width, channels) of logits.
    """
    logits, xs, ys = flat_heatmaps(heatmaps)
    channels = logits.shape[1]
    # Keras may have added an axis to the targets.
    targets = keras.ops.reshape(keras.ops.cast(targets, "float32"), (-1, channels, len(TARGET_FIELDS)))
    sigma = LOCALISER_HEATMAP_SIGMA_CELLS
    sigma_x, sigma_y = sigma / xs.shape[0], sigma / ys.shape[0]  # In normalised units.
    along_x = keras.ops.exp(-0.5 * ((xs - targets[..., X : X + 1]) / sigma_x) ** 2)
    along_y = keras.ops.exp(-0.5 * ((ys - targets[..., Y : Y + 1]) / sigma_y) ** 2)
    target = keras.ops.reshape(along_y[..., :, None] * along_x[..., None, :], (-1, channels, xs.shape[0] * ys.shape[0]))
    target = target / keras.ops.maximum(keras.ops.sum(target, axis=-1, keepdims=True), 1e-12)
    cross_entropy = -keras.ops.sum(target * keras.ops.log_softmax(logits, axis=-1), axis=-1)
    return masked_mean(cross_entropy, targets[..., COORDINATE_MASK])


def localiser_trainer(model):
    """The localiser with its heatmap logits as a second output, for training with both losses; it shares every
    layer with the localiser, which alone is saved and used."""
    return keras.Model(model.input, [model.output, model.get_layer("heatmaps").output], name="localiser_trainer")


def fit_localiser(studies, settings, options, progress):
    """Train the localiser on labelled studies, on its points and heatmaps, resuming from `progress` after its last
    finished epoch (its state is saved after every epoch); returns the model, BatchNormalization recalibrated on
    unaugmented training slices."""
    weights, _ = resolve_weights(settings.weights)
    batches = LocaliserBatches(studies, settings, options.seed, augment=True, workers=options.workers)
    model = build_localiser(
        settings.localiser_image_size,
        weights,
        is_from_scratch(settings),
        settings.localiser_peak_window,
        settings.localiser_width,
    )
    trainer = localiser_trainer(model)
    rate, epochs = settings.localiser_learning_rate, settings.localiser_epochs
    schedule = learning_rate_schedule(rate, len(batches), epochs, settings.localiser_final_learning_rate)
    trainer.compile(optimizer=keras.optimizers.Adam(schedule), loss=[localiser_loss, heatmap_loss])
    averaged = max(1, math.ceil(settings.localiser_averaged_share * epochs))
    if 1 not in progress.finished_phases:
        print(
            f"localiser: {len(studies)} studies, {len(batches.items)} slices an epoch, {settings.localiser_epochs} "
            f"epochs at {settings.localiser_image_size} px, learning rate {settings.localiser_learning_rate:g} "
            "(warm-up, then cosine decay)"
            + (f", keeping the mean of the last {averaged} epochs' weights" if averaged > 1 else "")
        )
        average_from = epochs - averaged + 1 if averaged > 1 else None
        run_phase(trainer, (batches, None, None), 1, 0, epochs, progress, average_from)
    # Without validation, the best epoch is the last.
    trainer.set_weights(saved_weights(progress.path(progress.averaged_file or progress.best_file)))
    if learning_batch_normalizations(model):
        statistics = LocaliserBatches(studies, settings, options.seed + 1, workers=options.workers)
        recalibrate_batch_normalization(model, statistics)
    return model


@dataclass
class Localiser:
    """A trained level localiser: its model, and what it learned from the labels' geometry (learn_offsets,
    learn_level_steps, learn_step_ranges), saved as localiser.keras and localiser.json beside it. Predicting, it also
    reads the model's heatmaps, to decode each condition's levels as a chain."""

    model: "keras.Model"  # Quoted: Keras is imported by import_tensorflow, after this class is defined.
    level_offsets_mm: dict | None
    level_steps_mm: dict | None = None
    chain_step_ranges: dict | None = None  # {condition: (low, high)}: learn_step_ranges; None before it was learned

    def __post_init__(self):
        self.predictor = keras.Model(self.model.input, [self.model.output, self.model.get_layer("heatmaps").output])

    def save(self, path):
        write_atomically(path, self.model.save)
        geometry = {
            "level_offsets_mm": self.level_offsets_mm,
            "level_steps_mm": self.level_steps_mm,
            "chain_step_ranges": self.chain_step_ranges,
        }
        write_json(geometry, Path(path).with_suffix(".json"))

    @classmethod
    def load(cls, path):
        """A saved localiser, in safe mode; refused clearly if it is not one, or if its geometry is not beside it."""
        path = Path(path)
        refuse_unreadable_file(path, "localiser (localiser.keras)", option="--localiser ")
        model = load_saved_model(path, severity=False)
        if model.name != "level_localiser":
            raise InputError(f"--localiser {path}: is a {model.name} model, not the level localiser (localiser.keras).")
        geometry = path.with_suffix(".json")
        try:
            learned = json.loads(geometry.read_text())
            return cls(
                model, learned["level_offsets_mm"], learned.get("level_steps_mm"), learned.get("chain_step_ranges")
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise InputError(
                f"--localiser {path}: its offsets, {geometry}, cannot be read ({type(error).__name__}: {error}). Keep "
                "localiser.json, which the training run wrote, beside localiser.keras."
            ) from None


def localise_split(localiser, competition_dir, split, out_path, workers=WORKERS, mixed=False, cache_dir=None):
    """Find the points of every study in a competition split and write them as a coordinates CSV (localised_rows);
    returns the path. The studies' slices go through a slice cache (cache_dir, or a temporary one), so they are
    decoded by `workers` processes and memory-mapped: memory stays flat in the number of studies.

    Counts the (study, condition, level) rows it could not place, which keep their best constant downstream."""
    study_ids = sorted(study_series(read_series_descriptions(competition_dir, split)))
    print(f"localising {len(study_ids)} {split} studies in {competition_dir}")
    size = localiser.model.input_shape[1]
    with contextlib.ExitStack() as temporary:
        if cache_dir is None:
            cache_dir = Path(temporary.enter_context(tempfile.TemporaryDirectory(prefix="slices-")))
        studies = read_localiser_studies(competition_dir, split, study_ids, size, workers=workers, cache_dir=cache_dir)
        found = localise_studies(localiser, studies)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    write_csv(localised_rows(found, mixed), out_path)
    placed = sum(len(points) for points in found.values())
    unplaced = len(study_ids) * len(WIDE_LABEL_COLUMNS) - placed
    print(
        f"wrote {placed:,} points to {out_path}; {unplaced:,} condition-levels could not be placed "
        f"(a study without that series, or no axial slice within {AXIAL_MATCH_MM:g} mm)."
    )
    return out_path


def localise_studies(localiser, studies, chains=None):
    """Localise every study, printing progress; returns {study_id: [LocalisedPoint, ...]}. With a dict `chains`, each
    study's chains are recorded there (localise_study)."""
    found, started = {}, time.time()
    for number, study in enumerate(studies, start=1):
        found[study.study_id] = localise_study(
            localiser, study, None if chains is None else chains.setdefault(study.study_id, [])
        )
        if number == len(studies) or number % max(1, len(studies) // 10) == 0:
            print(f"localised {number}/{len(studies)} studies ({time.time() - started:.0f} s)", flush=True)
    return found


def localised_rows(found, mixed=False):
    """The found points in train_label_coordinates.csv's format: one row each, on its slice; or, `mixed`, one row for
    each slice its severity is mixed over, with the slice's weight in a CROP_WEIGHT column."""
    if not mixed:
        rows = [point.row(study_id) for study_id, points in found.items() for point in points]
        return pd.DataFrame(rows, columns=COORDINATE_COLUMNS)
    rows = [
        point.row(study_id, index) | {CROP_WEIGHT: weight}
        for study_id, points in found.items()
        for point in points
        for index, weight in point.slices
    ]
    return pd.DataFrame(rows, columns=[*COORDINATE_COLUMNS, CROP_WEIGHT])


def localise_study(localiser, study, chains=None):
    """Every point of a study the localiser can place: up to 25, fewer where a series is missing. With a list
    `chains`, each chain decoded is recorded there as (condition, broken before, broken after): see chained_points."""
    sagittal = localise_sagittal(localiser, study, chains)
    return sagittal + localise_axial(localiser, study, sagittal)


def localise_sagittal(localiser, study, chains=None):
    """The canal points (Sagittal T2/STIR) and the foramina (Sagittal T1): every slice is run, and each level goes on
    the slice where it is most present; then each condition's five levels are placed on their slices as a chain. A
    foramen's slice is looked for near where the learned offsets put it from the canal points, else on its side of
    the midline."""
    found = []
    if "canal" in study.volumes:
        seen = every_slice_seen(localiser, study.volumes["canal"][0])
        every = {level: seen.indices for level in LEVELS}
        chosen = chained_slices(localiser, seen, "spinal_canal_stenosis", every)
        chosen = symmetric_slices(seen, "spinal_canal_stenosis", chosen)
        found += chained_points(localiser, seen, "spinal_canal_stenosis", chosen, every, chains)
    if "foramen" in study.volumes:
        seen = every_slice_seen(localiser, study.volumes["foramen"][0])
        stack = seen.stack
        rows, columns = stack.shape
        slice_x = np.array(
            [stack.pixel_to_world(index, columns / 2, rows / 2)[0] for index in range(len(stack.slices))]
        )
        canal = {(point.condition, point.level): point.world for point in found}
        expected = expected_points(canal, localiser.level_offsets_mm, kinds=("canal",))
        # The midline: the canal's, seen on T2, else the middle of the T1 stack. +x is the patient's left.
        midline = float(np.median([point[0] for point in canal.values()])) if canal else float(np.median(slice_x))
        window = 1.5 * (abs(stack.slice_spacing) or 3.0)
        for side, on_side in (("left", slice_x > midline), ("right", slice_x <= midline)):
            condition, candidates = f"{side}_neural_foraminal_narrowing", {}
            for level in LEVELS:
                candidates[level] = np.flatnonzero(on_side)
                if (condition, level) in expected:
                    near = np.flatnonzero(np.abs(stack.plane_distances(expected[(condition, level)])) <= window)
                    candidates[level] = near if len(near) else candidates[level]
            chosen = chained_slices(localiser, seen, condition, candidates)
            found += chained_points(localiser, seen, condition, chosen, candidates, chains)
    return found


def every_slice_seen(localiser, volume):
    """The localiser's outputs and heatmaps on every slice of a sagittal volume (SlicesSeen), whose rows are then the
    slice indices."""
    return predict_slices(localiser, volume, range(len(volume.images)))


def chained_slices(localiser, seen, condition, candidates):
    """{level: slice index}: the slice of each of a condition's levels among its candidate indices, chosen jointly, so
    that the steps across the stack from one level to the next are those the labels show (the canal drifts little
    from its midline, a foramen by its level's width): the most likely slices under each level's presence (smoothed
    across neighbouring slices) and a Gaussian for each step along the stack's normal, from the learned steps
    (learn_level_steps), CHAIN_SLICE_SD_FACTOR times as wide. On real MR, where a disc is present on many slices, this
    keeps L5/S1 from a slice 2-4 off the others' (benchmarks/REAL_MR.md). Without learned steps, or where a level has
    no candidate, each level goes where it is most present."""
    candidates = {level: np.asarray(indices, int) for level, indices in candidates.items() if len(indices)}
    stack = seen.stack
    along = stack.positions @ stack.normal
    presence = level_presence(seen, condition)
    steps = (localiser.level_steps_mm or {}).get(condition)
    if steps is None or len(candidates) < len(LEVELS):
        return {level: int(indices[np.argmax(presence[level][indices])]) for level, indices in candidates.items()}
    scores = [np.log(np.maximum(presence[level][candidates[level]], 1e-6)) for level in LEVELS]
    transitions = []
    for upper, lower, (mean, sd) in zip(LEVELS, LEVELS[1:], steps):
        expected = float(np.asarray(mean) @ stack.normal)
        spread = CHAIN_SLICE_SD_FACTOR * float(np.linalg.norm(np.asarray(sd) * stack.normal))
        step = along[candidates[lower]][None] - along[candidates[upper]][:, None]
        transitions.append(-0.5 * ((step - expected) / spread) ** 2)
    picks = best_path(scores, transitions)
    return {level: int(candidates[level][pick]) for level, pick in zip(LEVELS, picks)}


def level_presence(seen, condition):
    """{level: its presence on each slice of the stack, smoothed across slices (smoothed_presence)} for a condition's
    levels, from the localiser's outputs on every slice (every_slice_seen)."""
    along = seen.stack.positions @ seen.stack.normal
    channels = level_channels(condition)
    return {level: smoothed_presence(seen.outputs[:, channels[level], 2], along) for level in LEVELS}


def smoothed_presence(presence, along):
    """One level's presence on each slice (in stack order, at positions `along` the normal), averaged with its
    neighbours' by weights 1/4, 1/2, 1/4 (an edge slice standing in for its missing neighbour): where a level is
    present on several slices, the middle of them wins rather than a noisy peak at their edge. Real MR, 30 studies:
    slice within one 87 -> 89 %; the phantoms' sharp presence keeps its peak."""
    order = np.argsort(along)
    ordered = np.asarray(presence, float)[order]
    padded = np.concatenate([ordered[:1], ordered, ordered[-1:]])
    smoothed = np.empty_like(ordered)
    smoothed[order] = 0.5 * ordered + 0.25 * (padded[:-2] + padded[2:])
    return smoothed


def symmetric_slices(seen, condition, chosen):
    """{level: slice index}: each of a condition's levels ({level: slice index} `chosen`) moved to the slice nearest
    the plane about which the anatomy around it is mirror-symmetric, where that is clearly better than where it is.
    The presence finds the midline, but not each level's own place across it (a spine bends sideways a little, and a
    disc is present on many slices); the anatomy about a disc's centre is left-right symmetric whatever the contrast.
    Each slice, and each point halfway between two, is tried as the centre: the patch around the level's point on the
    slices at equal distances either side is compared (their correlation, averaged over the pairs out to
    SYMMETRY_REACH_MM); a centre needs all its pairs in the stack and the level present there (SYMMETRY_PRESENCE_FLOOR).
    A halfway centre goes to the more present of its two slices. Slices are paired by their order, so a stack whose
    slices are not evenly spaced (a gap, a repeated position) keeps its slices, as does one too thin to pair."""
    channels = level_channels(condition)
    volume, stack = seen.volume, seen.stack
    along, spacing = stack.positions @ stack.normal, stack.slice_spacing  # along rises: stacks are sorted by it
    reach = max(1, round(SYMMETRY_REACH_MM / spacing)) if spacing > 0 else 0
    count = len(volume.images)
    if not reach or count < 2 * reach + 1 or np.abs(np.diff(along) - spacing).max() > 0.25 * spacing:
        return chosen
    lower = np.arange(2 * count - 1) // 2  # centre c (in half slices) lies on slice c // 2, or between it and the next
    upper = (np.arange(2 * count - 1) + 1) // 2
    moved, presences = dict(chosen), level_presence(seen, condition)
    for level, index in chosen.items():
        presence = presences[level]
        symmetry = mirror_symmetry(level_patches(volume, seen.outputs[index, channels[level], :2]), reach)
        symmetry[np.maximum(presence[lower], presence[upper]) < SYMMETRY_PRESENCE_FLOOR * presence.max()] = np.nan
        if np.all(np.isnan(symmetry)):
            continue
        best = int(np.nanargmax(symmetry))
        if not symmetry[best] - SYMMETRY_MARGIN <= symmetry[2 * index]:  # also where the pick itself is no centre
            moved[level] = int(lower[best] if presence[lower[best]] >= presence[upper[best]] else upper[best])
    return moved


def level_patches(volume, point):
    """(slices, pixels): each slice's patch SYMMETRY_HALF_WIDTH_MM each way around a normalised (x, y) `point` of the
    localiser's input, standardised to mean 0 and variance 1 (a flat patch to 0)."""
    size = volume.images.shape[1]
    row_mm, column_mm = np.asarray(volume.stack.pixel_spacing, float) * volume.stack.shape / size
    x, y = from_unit(*point, (size, size))
    half_x, half_y = (max(1, round(SYMMETRY_HALF_WIDTH_MM / mm)) for mm in (column_mm, row_mm))
    left, top = int(np.clip(round(x) - half_x, 0, size - 1)), int(np.clip(round(y) - half_y, 0, size - 1))
    patches = volume.images[:, top : round(y) + half_y + 1, left : round(x) + half_x + 1]
    patches = patches.reshape(len(patches), -1).astype(np.float32)
    centred = patches - patches.mean(axis=1, keepdims=True)
    spread = centred.std(axis=1, keepdims=True)
    return np.divide(centred, spread, out=np.zeros_like(centred), where=spread > 0)


def mirror_symmetry(patches, reach):
    """For each centre c in half slices (0 .. 2 * slices - 2), the mean correlation of the standardised patches of the
    slices 1 .. `reach` steps either side of it (a slice: c / 2 ± k; halfway: its two slices, then outwards); NaN
    where a pair would leave the stack."""
    count = len(patches)
    correlation = patches @ patches.T / max(1, patches.shape[1])
    scores = np.full(2 * count - 1, np.nan)
    steps = np.arange(1, reach + 1)
    for centre in range(2 * count - 1):
        halfway = centre % 2
        below, above = (centre - halfway) // 2 - steps + halfway, (centre + halfway) // 2 + steps - halfway
        if below.min() >= 0 and above.max() < count:
            scores[centre] = correlation[below, above].mean()
    return scores


def chained_points(localiser, seen, condition, chosen, candidates, chains=None):
    """The points of one condition's levels, each on its chosen slice ({level: slice index} of a volume whose every
    slice the localiser has seen: every_slice_seen), decoded as a chain: the places each level's heatmap offers are
    chosen jointly, so that the five levels lie in order down the spine on five discs, with steps like the labels'
    (best_chain).
    Where the chosen slices hold no such chain, the levels the presence does not see (unseen_levels) may take their
    place on any of their `candidates` slices, the others staying on theirs (chain_places). Without learned steps, or
    without all five levels, each level takes its own heatmap's peak.

    With a list `chains`, records (condition, whether the peaks alone broke the chain, whether the chain does)."""
    channels = level_channels(condition)
    peaks = [point_on(seen, index, channels[level], condition, level) for level, index in chosen.items()]
    steps = (localiser.level_steps_mm or {}).get(condition)
    if steps is None or len(chosen) < len(LEVELS):
        return peaks
    bounds = step_range(localiser, condition)
    places = chain_places(seen, condition, {level: [index] for level, index in chosen.items()})
    picks = best_chain_of(places, steps, bounds)
    unseen = unseen_levels(seen, condition, candidates) if picks is None else set()
    if unseen:
        slices = {level: candidates[level] if level in unseen else [index] for level, index in chosen.items()}
        places = chain_places(seen, condition, slices)
        picks = best_chain_of(places, steps, bounds)
    chained = peaks
    if picks is not None:
        chained = []
        for level, pick in zip(LEVELS, picks):
            index, place, _, score, peak = places[level][pick]
            trust = chain_trust(score - peak)
            chained.append(point_on(seen, index, channels[level], condition, level, place, trust))
    if chains is not None:
        before, after = ([point.world for point in points] for points in (peaks, chained))
        chains.append((condition, chain_broken(before, steps, bounds), chain_broken(after, steps, bounds)))
    return chained


def chain_places(seen, condition, slices):
    """{level: [(slice index, (x, y) normalised, world point, score, the score of the slice's best place), ...]}: the
    places each level's heatmap offers (heatmap_candidates) on each of its `slices` ({level: slice indices}), for
    best_chain. On one slice a level's first place is its map's peak.

    Across slices, the places are scored by the heatmaps alone: they are offered for the levels the presence does not
    see. (Real MR's subject 29, a scoliosis whose canal sweeps 50 mm across the slices: its presence stays under 0.1 on
    every slice for L1/L2-L4/L5, and its levels, each on its own peak, put two on one disc in every build of three
    model sets; with those four chained over every slice, two on one disc in 2 of the 11 builds where no chain held on
    the chosen slices, and in 5 with L5/S1, which the presence sees, chained over every slice too:
    benchmarks/REAL_MR.md.)"""
    kind_channels = KIND_CHANNELS[CONDITION_KIND[condition]]
    channels = level_channels(condition)
    places = {level: [] for level in LEVELS}
    for level in LEVELS:
        for index in slices.get(level, ()):
            offered = heatmap_candidates(seen.heatmaps[index], channels[level], kind_channels)
            for place, score in offered:
                world = seen.stack.pixel_to_world(index, *from_unit(*place, seen.stack.shape))
                places[level].append((index, place, world, score, offered[0][1]))
    return places


def best_chain_of(places, steps, bounds):
    """best_chain over chain_places' places: the index of each level's pick, or None where there is no chain (or a
    level has no place)."""
    if not all(places.values()):
        return None
    return best_chain([[(world, score) for _, _, world, score, _ in places[level]] for level in LEVELS], steps, bounds)


def step_range(localiser, condition):
    """(low, high): the range of a condition's step lengths, as multiples of the mean step's, that a chain may have:
    the localiser's learned one (learn_step_ranges), else CHAIN_STEP_RANGE."""
    return tuple((localiser.chain_step_ranges or {}).get(condition, CHAIN_STEP_RANGE))


def unseen_levels(seen, condition, candidates):
    """The levels of a condition whose presence, smoothed across slices (smoothed_presence), stays under
    CHAIN_UNSEEN_PRESENCE on every one of their `candidates` slices ({level: slice indices})."""
    presence = level_presence(seen, condition)
    return {
        level
        for level, indices in candidates.items()
        if len(indices) and presence[level][list(indices)].max() < CHAIN_UNSEEN_PRESENCE
    }


def chain_trust(log_ratio):
    """The share of a chained level's prediction its crops carry, from the log of its map's probability at the chosen
    place over that at its own peak (0 where the chain kept the peak): 1 down to a ratio of CHAIN_TRUST_RATIO, then
    in proportion. (Seed 23: the one point placed 12 mm off had a ratio of 0.23, and its severe label got 0.0004;
    hedged, the cost of localisation 0.095 → 0.059. The points the chain keeps on their peaks are unchanged.)"""
    return float(min(1.0, math.exp(log_ratio) / CHAIN_TRUST_RATIO))


def heatmap_candidates(heatmaps, channel, kind_channels, count=CHAIN_CANDIDATES, window=LOCALISER_PEAK_WINDOW):
    """Where a point may be on one slice, from its heatmap logits (height, width, channels): up to `count` places,
    each a peak of this channel's map or of another level's (a disc another level sees may be this one's), as
    ((x, y) normalised like the model's points, the log of this channel's probability at its cell). Each
    place is refined as the model refines its peak, on the map that peaks there: that map's expected position within
    `window` cells of the peak."""
    height, width, _ = heatmaps.shape
    logits = heatmaps.astype(np.float64)
    probabilities = np.exp(logits - logits.max(axis=(0, 1)))
    probabilities /= probabilities.sum(axis=(0, 1))
    peaks = {}  # {(row, column): the map that refines it: this channel's where it peaks, else the surest other's}
    for other in kind_channels:  # Cells above all eight neighbours: a flat map has none.
        padded = np.pad(logits[..., other], 1, constant_values=-np.inf)
        around = [padded[dy : dy + height, dx : dx + width] for dy in range(3) for dx in range(3) if (dy, dx) != (1, 1)]
        for cell in zip(*np.nonzero(logits[..., other] > np.max(around, axis=0))):
            known = peaks.get(cell)
            if (
                known is None
                or other == channel
                or (known != channel and probabilities[(*cell, other)] > probabilities[(*cell, known)])
            ):
                peaks[cell] = other
    # Scored by this channel's log probability at the peak's cell, so that its own highest cell, the model's point,
    # always comes first: where the points already make a chain, decoding it changes nothing.
    scored = [
        (float(np.log(max(probabilities[row, column, channel], 1e-30))), row, column, other)
        for (row, column), other in peaks.items()
    ]
    kept = []  # The best of peaks in neighbouring cells (two levels' maps peaking on one disc) is offered once.
    for score, row, column, other in sorted(scored, reverse=True):
        if len(kept) < count and all(max(abs(row - r), abs(column - c)) > 1 for _, r, c, _ in kept):
            kept.append((score, row, column, other))
    candidates = []
    for score, row, column, other in kept:
        rows = slice(max(row - window, 0), min(row + window + 1, height))
        columns = slice(max(column - window, 0), min(column + window + 1, width))
        weights = probabilities[rows, columns, other]
        ys, xs = np.mgrid[rows, columns]
        x = float(((xs + 0.5) * weights).sum() / weights.sum() / width)
        y = float(((ys + 0.5) * weights).sum() / weights.sum() / height)
        candidates.append(((x, y), score))
    return candidates


def best_chain(candidates, steps, bounds):
    """The choice of one candidate per level with the highest total score among the chains the labels would draw:
    each step between neighbouring levels plausible (plausible_steps). Where the levels' own best places already
    make such a chain, it is kept as it is; where they do not (two levels on one disc, a level out of order, a disc
    skipped), the levels that must move are those whose maps are the least sure.

    candidates: per level, in LEVELS order, [(world point, score), ...]; steps: per neighbouring pair, the mean step
    and its standard deviation (learn_level_steps); bounds: the step lengths' range (step_range). Returns the index
    chosen for each level, or None when no chain is possible."""
    points = [np.array([point for point, _ in offered], float) for offered in candidates]
    transitions = [
        np.where(plausible_steps(here[None] - before[:, None], mean, bounds), 0.0, -np.inf)
        for before, here, (mean, _) in zip(points, points[1:], steps)
    ]
    return best_path([np.array([score for _, score in offered], float) for offered in candidates], transitions)


def best_path(scores, transitions):
    """The index chosen at each stage of a chain that maximises the sum of the stages' `scores` (one array per stage)
    and the `transitions` between neighbouring stages (one matrix per pair, [earlier, later]), by dynamic
    programming; None when every path scores -inf."""
    best, back = [scores[0]], []
    for transition, here in zip(transitions, scores[1:]):
        total = best[-1][:, None] + transition
        back.append(total.argmax(axis=0))
        best.append(total.max(axis=0) + here)
    if not np.isfinite(best[-1]).any():
        return None
    chosen = [int(best[-1].argmax())]
    for pointers in reversed(back):
        chosen.append(int(pointers[chosen[-1]]))
    return chosen[::-1]


def plausible_steps(steps, mean, bounds):
    """Whether each step (..., 3) in the world from one level down to the next is one the labels would draw: its
    length within `bounds` (step_range) of the mean step's, its direction within CHAIN_STEP_ANGLE degrees of the
    mean's. Two levels on one disc, a level above the one it belongs below, or a disc skipped, are not."""
    mean = np.asarray(mean, float)
    lengths, usual = np.linalg.norm(steps, axis=-1), np.linalg.norm(mean)
    low, high = bounds
    along = (steps @ mean) / np.maximum(lengths * usual, 1e-9)
    return (lengths >= low * usual) & (lengths <= high * usual) & (along >= np.cos(np.radians(CHAIN_STEP_ANGLE)))


def chain_broken(points, steps, bounds):
    """True when a chain of level points (world, in LEVELS order) has a step the labels would not draw."""
    return not all(
        plausible_steps(np.asarray(lower, float) - np.asarray(upper, float), mean, bounds)
        for (mean, _), upper, lower in zip(steps, points, points[1:])
    )


def localise_axial(localiser, study, sagittal):
    """The left and right recess points of each level. Geometry picks the slice nearest to where the learned offsets
    put the level's recesses from its sagittal points; each recess then goes on whichever of that slice and its two
    neighbours it is most present on. (Geometry alone put 65 % of the recesses on their labelled slice, found canal
    points being 1-3 mm off along the spine; the presence head brings that to 76 %: seed 5, 20 test studies.)"""
    matches = match_axial_slices(study.volumes.get("recess", []), level_points(sagittal, localiser.level_offsets_mm))
    near = {
        level: [each for each in (index - 1, index, index + 1) if 0 <= each < len(volume.images)]
        for level, (volume, index, _) in matches.items()
    }
    outputs = {}  # {(id(volume), slice index): output}: one call per volume, as a call costs a whole batch.
    for volume in {id(volume): volume for volume, _, _ in matches.values()}.values():
        indices = sorted({each for level, match in matches.items() if match[0] is volume for each in near[level]})
        predicted = predict_slices(localiser, volume, indices).outputs
        outputs.update({(id(volume), each): output for each, output in zip(indices, predicted)})
    found = []
    left, right = KIND_CHANNELS["recess"]
    for level, (volume, _, _) in matches.items():
        seen = SlicesSeen(volume, near[level], np.stack([outputs[id(volume), each] for each in near[level]]))
        for channel, side in ((left, "left"), (right, "right")):
            row = most_present(seen.outputs, channel, range(len(seen.indices)))
            condition = f"{side}_subarticular_stenosis"
            found.append(point_on(seen, row, channel, condition, level))
    return found


def level_points(sagittal, offsets=None):
    """Each level's world point for matching axial slices: the midpoint of its lateral recesses where the learned
    offsets place them, else its canal point, else the middle of its foramina."""
    points = {(point.condition, point.level): point.world for point in sagittal}
    expected = expected_points(points, offsets)
    canal, foramina = reference_points(points, "canal"), reference_points(points, "foramina")
    levels = {}
    for level in LEVELS:
        recesses = [expected.get((f"{side}_subarticular_stenosis", level)) for side in ("left", "right")]
        if all(point is not None for point in recesses):
            levels[level] = np.mean(recesses, axis=0)
        elif level in canal:
            levels[level] = canal[level]
        elif level in foramina:
            levels[level] = foramina[level]
    return levels


def match_axial_slices(volumes, points):
    """{level: (volume, index, distance)}: each level's nearest axial slice, across all axial stacks and series.

    Every slice first goes to the level whose point is nearest to its plane, so neighbouring levels never share a
    slice (the boundary is their midpoint); a level then takes its nearest slice, if within AXIAL_MATCH_MM.
    """
    if not points:
        return {}
    levels = list(points)
    best = {}
    for volume in volumes:
        stack = volume.stack
        distances = np.stack([stack.plane_distances(points[level]) for level in levels], axis=1)  # (slices, levels)
        owners = np.argmin(np.abs(distances), axis=1)
        for index, owner in enumerate(owners):
            level, distance = levels[owner], abs(distances[index, owner])
            x, y, _ = stack.world_to_pixel(points[level], index)
            if distance <= AXIAL_MATCH_MM and stack.contains(x, y):
                if level not in best or distance < best[level][2]:
                    best[level] = (volume, index, distance)
    return best


def most_present(outputs, channel, candidates):
    """The slice, among candidate indices of one stack's outputs, where the point of one channel is most present."""
    candidates = np.asarray(candidates)
    return int(candidates[np.argmax(outputs[candidates, channel, 2])])


LOCALISER_PREDICT_BATCH = 32  # slices per call: a sagittal stack (15-20 slices) in one


def predict_slices(localiser, volume, indices):
    """What the localiser sees on some slices of a volume (SlicesSeen), its presence logits made probabilities."""
    indices = list(indices)
    images = localiser_input([triplet(volume, index) for index in indices])
    outputs, heatmaps = predict_in_batches(localiser.predictor, images, LOCALISER_PREDICT_BATCH)
    outputs = np.asarray(outputs, np.float64)
    outputs[..., 2] = 1.0 / (1.0 + np.exp(-outputs[..., 2]))
    return SlicesSeen(volume, indices, outputs, heatmaps)


@dataclass(frozen=True)
class SlicesSeen:
    """The localiser's view of some slices of a volume: for the slice indices[row], outputs[row] (channels, 3) holds
    each channel's normalised x, y and presence, and heatmaps[row] (height, width, channels) its heatmap logits (None
    where they are not needed)."""

    volume: Volume
    indices: list
    outputs: np.ndarray
    heatmaps: np.ndarray | None = None

    @property
    def stack(self):
        return self.volume.stack


@dataclass(frozen=True)
class LocalisedPoint:
    """One found point, in train_label_coordinates.csv's terms plus its world position."""

    condition: str
    level: str
    volume: Volume
    index: int
    x: float  # pixels of the original slice
    y: float
    slices: tuple  # ((slice index, weight), ...): the slices its severity is averaged over (mixed_slices)

    @property
    def world(self):
        return self.volume.stack.pixel_to_world(self.index, self.x, self.y)

    def row(self, study_id, index=None):
        """Its row in train_label_coordinates.csv's format, on its own slice or another one of its stack."""
        header = self.volume.stack.slices[self.index if index is None else index]
        return {
            "study_id": study_id,
            "series_id": self.volume.stack.series_id,
            "instance_number": header.instance_number,
            "condition": self.condition.replace("_", " ").title(),
            "level": self.level.upper().replace("_", "/"),
            "x": round(self.x, 2),
            "y": round(self.y, 2),
        }


def point_on(seen, row, channel, condition, level, place=None, trust=1.0):
    """A LocalisedPoint on the seen slice seen.indices[row], at `place` (normalised x, y) or else where that slice's
    output channel puts it, in the slice's own pixels; its severity mixes in the slices beside it among those seen,
    whose weights sum to `trust` (the rest goes to the row's best constant: chain_trust)."""
    x, y = from_unit(*(seen.outputs[row, channel, :2] if place is None else place), seen.stack.shape)
    slices = mixed_slices(seen.indices, seen.outputs[:, channel, 2], seen.indices[row], trust)
    return LocalisedPoint(condition, level, seen.volume, seen.indices[row], x, y, slices)


def mixed_slices(indices, presences, chosen, trust=1.0):
    """((slice index, weight), ...): the chosen slice and those beside it among `indices`, weighted by their
    `presences` ** SLICE_MIX_POWER; a neighbour under SLICE_MIX_MINIMUM is left out. The weights sum to `trust`
    (up to rounding): below 1, the rest of the row's prediction is its best constant (row_probabilities).

    The labels' slice is the one nearest the point, and two slices can be nearly as near: then the localiser's
    presence is split between them, and so is the prediction. (Seed 11's 20 test studies: the subarticular score at
    the found points 0.463 → 0.400, against 0.377 at the true ones; the others within ±0.004.) The point lies on the
    chosen slice, which stays in the mix even where a neighbour takes all the presence: it keeps at least the least
    weight that CROP_WEIGHT_DECIMALS can write, so every weight written is a number > 0, as the reader requires."""
    near = [(index, presence) for index, presence in zip(indices, presences) if abs(index - chosen) <= 1]
    weights = np.nan_to_num(np.array([presence for _, presence in near], np.float64)) ** SLICE_MIX_POWER
    least = 10.0**-CROP_WEIGHT_DECIMALS
    trust = min(max(float(trust), least), 1.0)
    if not weights.sum() > 0:
        return ((int(chosen), max(round(trust, CROP_WEIGHT_DECIMALS), least)),)
    weights /= weights.sum()
    kept = {index: weight for (index, _), weight in zip(near, weights) if weight >= SLICE_MIX_MINIMUM}
    kept[chosen] = max(kept.get(chosen, 0.0), least)
    total = sum(kept.values())
    return tuple(
        (int(index), max(round(float(trust * weight / total), CROP_WEIGHT_DECIMALS), least))
        for index, weight in sorted(kept.items())
    )


# Where the levels lie. The localiser sees one slice at a time; which slice holds a point also follows from the
# anatomy: a foramen lies a learned distance to the side of its level's canal point, a lateral recess in front of
# it. Those offsets are learned from the training labels in the spine's own frame at each level (up the spine, to
# the patient's left, and front to back), so they hold however the spine curves and the slices tilt.


def reference_points(points, kind):
    """{level: world point} of the levels whose reference point `points` ({(condition, level): world}) hold: the
    canal's point (kind "canal"), or the midpoint of the two foramina (kind "foramina")."""
    references = {}
    for level in LEVELS:
        if kind == "canal" and ("spinal_canal_stenosis", level) in points:
            references[level] = np.asarray(points[("spinal_canal_stenosis", level)], float)
        sides = [points.get((f"{side}_neural_foraminal_narrowing", level)) for side in ("left", "right")]
        if kind == "foramina" and all(point is not None for point in sides):
            references[level] = np.mean(sides, axis=0)
    return references


def spine_frames(references):
    """{level: 3×3 matrix} whose columns are the spine's directions at each level of `references` ({level: world}):
    up the spine (from the level below to the level above), the patient's left across it, and front to back. Needs
    two levels; none otherwise."""
    levels = [level for level in LEVELS if level in references]
    frames = {}
    for number, level in enumerate(levels if len(levels) > 1 else []):
        above = references[levels[max(number - 1, 0)]]  # LEVELS run from L1/L2 down to L5/S1.
        below = references[levels[min(number + 1, len(levels) - 1)]]
        up = (above - below) / np.linalg.norm(above - below)
        left = np.array([1.0, 0.0, 0.0]) - up[0] * up  # The patient's +x, made square to the spine.
        left /= np.linalg.norm(left)
        frames[level] = np.stack([up, left, np.cross(up, left)], axis=1)
    return frames


def learn_offsets(studies):
    """{reference kind: {"condition level": [up, left, back] mm}}: the median offset, in the spine's frame, from each
    level's reference point to its foramina and lateral recesses, over the labelled studies that have both."""
    offsets = {}
    for kind in ("canal", "foramina"):
        found = {}
        for study in studies:
            references = reference_points(study.points, kind)
            frames = spine_frames(references)
            for (condition, level), point in study.points.items():
                if CONDITION_KIND[condition] != "canal" and level in frames:
                    offset = frames[level].T @ (np.asarray(point) - references[level])
                    found.setdefault(f"{condition} {level}", []).append(offset)
        offsets[kind] = {key: np.median(values, axis=0).round(3).tolist() for key, values in found.items()}
    return offsets


def learn_level_steps(studies):
    """{condition: [(mean, sd), ...]}: for the canal and each side's foramina, the step in the world (mm) from each
    level's labelled point to the next one down, its mean and standard deviation (at least CHAIN_MIN_SD_MM) over the
    labelled studies that have both."""
    steps = {}
    for condition in CHAIN_CONDITIONS:
        pairs = []
        for upper, lower in zip(LEVELS, LEVELS[1:]):
            found = [
                np.asarray(study.points[(condition, lower)]) - np.asarray(study.points[(condition, upper)])
                for study in studies
                if (condition, upper) in study.points and (condition, lower) in study.points
            ]
            if len(found) < 2:
                break
            sd = np.maximum(np.std(found, axis=0), CHAIN_MIN_SD_MM)
            pairs.append((np.mean(found, axis=0).round(3).tolist(), sd.round(3).tolist()))
        else:
            steps[condition] = pairs
    return steps


def learn_step_ranges(studies, steps):
    """{condition: (low, high)}: for each condition with learned steps (learn_level_steps), the range of step lengths,
    as multiples of each pair's mean step, that holds 99 % of the labelled chains: the 0.5th percentile of each
    study's shortest step and the 99.5th of its longest, widening CHAIN_STEP_RANGE but never beyond
    CHAIN_STEP_RANGE_LIMITS."""
    ranges = {}
    for condition, pairs in steps.items():
        usual = [np.linalg.norm(mean) for mean, _ in pairs]
        shortest, longest = [], []
        for study in studies:
            points = [study.points.get((condition, level)) for level in LEVELS]
            if any(point is None for point in points):
                continue
            ratios = [
                np.linalg.norm(np.subtract(lower, upper)) / length
                for upper, lower, length in zip(points, points[1:], usual)
            ]
            shortest.append(min(ratios))
            longest.append(max(ratios))
        if not shortest:
            continue
        (least, most), (low, high) = CHAIN_STEP_RANGE_LIMITS, CHAIN_STEP_RANGE
        ranges[condition] = (
            round(float(min(low, max(least, np.quantile(shortest, 0.005)))), 3),
            round(float(max(high, min(most, np.quantile(longest, 0.995)))), 3),
        )
    return ranges


def expected_points(points, offsets, kinds=("canal", "foramina")):
    """{(condition, level): world}: where the learned offsets put each foramen and recess, from the reference points
    that `points` hold (the canal's where found, else the foramina's)."""
    expected = {}
    for kind in kinds:
        references = reference_points(points, kind)
        frames = spine_frames(references)
        for key, offset in (offsets or {}).get(kind, {}).items():
            condition, level = key.split(" ")
            if level in frames and (condition, level) not in expected:
                expected[(condition, level)] = references[level] + frames[level] @ np.asarray(offset, float)
    return expected


def localisation_metrics(found, studies, chains=None):
    """Localisation error on labelled studies, by condition group: the points' distance in mm, how many land
    within 5 and 10 mm, level swaps (a point nearer another level's true point than its own), and slices within
    one instance of the labelled one (in the labelled series). With `chains` ({study_id: localise_study's record}),
    also how many studies had a broken chain of levels in that group before decoding them as a chain, and after."""
    rows = []
    for study in studies:
        truth = study.points
        for point in found.get(study.study_id, []):
            key = (point.condition, point.level)
            if key not in truth:
                continue
            distance = float(np.linalg.norm(point.world - truth[key]))
            others = [
                np.linalg.norm(point.world - truth[(point.condition, level)])
                for level in LEVELS
                if level != point.level and (point.condition, level) in truth
            ]
            labelled_volume, labelled_index = study.labels[key]
            labelled = labelled_volume.stack.slices[labelled_index].instance_number
            header = point.volume.stack.slices[point.index]
            rows.append(
                {
                    "group": condition_groups([point.condition]).iloc[0],
                    "mm": distance,
                    "swap": bool(others) and min(others) < distance,
                    "slice": point.volume.stack.series_id == labelled_volume.stack.series_id
                    and abs(header.instance_number - labelled) <= 1,
                }
            )
    table = pd.DataFrame(rows, columns=["group", "mm", "swap", "slice"])
    metrics = {}
    for group, part in table.groupby("group", sort=False):
        metrics[group] = {
            "points": len(part),
            "median_mm": float(part["mm"].median()),
            "p90_mm": float(np.percentile(part["mm"], 90)),
            "within_5mm": float((part["mm"] <= 5).mean()),
            "within_10mm": float((part["mm"] <= 10).mean()),
            "level_swaps": float(part["swap"].mean()),
            "slice_within_one": float(part["slice"].mean()),
        }
    for group in metrics if chains else ():
        for moment, column in (("before", 1), ("after", 2)):
            broken = [
                any(record[column] for record in records if condition_groups([record[0]]).iloc[0] == group)
                for records in chains.values()
            ]
            metrics[group][f"studies_with_a_broken_chain_{moment}"] = int(sum(broken))
    return metrics


def print_localisation(metrics, studies):
    print(f"\nlocalisation on {studies} validation studies (whole studies held out from the localiser)")
    print(
        f"  {'group':<14}{'points':>7}{'median':>9}{'p90':>8}{'≤5 mm':>8}{'≤10 mm':>8}{'swaps':>7}{'slice±1':>9}"
        "  studies with a broken chain: peaks → chain"
    )
    for group, row in metrics.items():
        chains = (
            f"  {row['studies_with_a_broken_chain_before']} → {row['studies_with_a_broken_chain_after']}"
            if "studies_with_a_broken_chain_before" in row
            else ""
        )
        print(
            f"  {group:<14}{row['points']:>7}{row['median_mm']:>7.1f}mm{row['p90_mm']:>6.1f}mm"
            f"{row['within_5mm']:>8.0%}{row['within_10mm']:>8.0%}{row['level_swaps']:>7.0%}"
            f"{row['slice_within_one']:>9.0%}{chains}"
        )


def save_localisation_plot(found, studies, output_dir, count=3):
    """localisation.png: a few validation studies' canal, foramen and axial slices with the labelled points (green)
    and the found ones (red), also shown inline in a notebook; returns its path, or None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    if not in_notebook():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    studies = [study for study in studies if study.labels][:count]
    if not studies:
        return None
    figure, axes = plt.subplots(len(studies), 3, figsize=(10, 3.4 * len(studies)), squeeze=False)
    for row, study in zip(axes, studies):
        points = found.get(study.study_id, [])
        for axis, kind in zip(row, ("canal", "foramen", "recess")):
            axis.set_axis_off()
            labelled = [(key, place) for key, place in study.labels.items() if CONDITION_KIND[key[0]] == kind]
            if not labelled:
                continue
            volume, index = labelled[0][1]  # The first labelled slice of this kind, and every point on it.
            on_image = functools.partial(resized_pixel, volume.stack.shape, volume.images.shape[1:])
            axis.imshow(volume.images[index], cmap="gray")
            for (condition, level), (other, other_index) in labelled:
                if other is volume and other_index == index:
                    x, y, _ = volume.stack.world_to_pixel(study.points[(condition, level)], index)
                    axis.plot(*on_image(x, y), "o", color="lime", ms=4)
            for point in points:
                if point.volume is volume and point.index == index:
                    axis.plot(*on_image(point.x, point.y), "x", color="red", ms=5)
            axis.set_title(
                f"{study.study_id} {kind}, instance {volume.stack.slices[index].instance_number}", fontsize="small"
            )
    figure.suptitle("validation: labelled (green) and found (red) points on the labelled slices", fontsize="small")
    figure.tight_layout()
    path = output_dir / "localisation.png"
    write_atomically(path, figure.savefig)
    if in_notebook():
        from IPython.display import display

        display(figure)
    plt.close(figure)
    return path


# == 9. the severity model =============================================================================================


@dataclass
class TrainingRun:
    """What every stage of a training run shares (start_run)."""

    options: argparse.Namespace
    settings: SeveritySettings
    localiser_settings: LocaliserSettings | None  # With a competition folder and --localiser-epochs > 0.
    table: "pd.DataFrame"  # Quoted: run as a script, pandas is imported by main (import_pandas).
    test_table: "pd.DataFrame | None"  # None until a competition's test studies are prepared.
    folds: list  # (training rows, validation rows) of each fold.
    weights: str | None  # What ResNet50 loads (resolve_weights),
    weights_source: str  # and where it comes from, in words.
    strategy: "tf.distribute.Strategy"  # Quoted: TensorFlow is imported later (import_tensorflow).
    policy: str
    output_dir: Path
    constants: dict  # The best constant per location: the prior the models must beat.
    localisation: object = None  # The LocaliserReport, when this run trained the level localiser.

    @property
    def fold_count(self):
        return len(self.folds)

    @property
    def resume_dir(self):
        return self.output_dir / ".resume"


@dataclass
class FoldResult:
    """What one fold leaves for the run's outputs."""

    model_path: Path
    history: "pd.DataFrame"  # Quoted, as TrainingRun's tables.
    validation_rows: np.ndarray  # The table rows it predicted (all of its validation rows but skipped images).
    validation_probabilities: np.ndarray
    test_probabilities: np.ndarray  # One row per test image.


def run_fold(run, fold, train_rows, validation_rows):
    """Train one fold, or reuse what an interrupted run finished, and predict its validation rows and the test set."""
    state = Progress.load(run.resume_dir / f"fold{fold}")
    model_path = run.output_dir / ("model.keras" if run.fold_count == 1 else f"model_fold{fold}.keras")
    print(f"\nfold {fold}/{run.fold_count}: {len(train_rows)} training rows, {len(validation_rows)} validation rows")
    if state.done:
        print("finished before the interruption: reusing its model and predictions")
    else:
        keras.mixed_precision.set_global_policy(run.policy)  # clear_session() after a fold resets it.
        model = train_fold(
            run.table, train_rows, validation_rows, run.settings, run.options, run.weights, state, run.strategy
        )
        write_atomically(model_path, model.save)
        if run.strategy.num_replicas_in_sync > 1:  # Keras predicts unevenly split batches on one device only.
            del model
            keras.backend.clear_session()
            model = load_saved_model(model_path)
        validation_images = run.table["image_path"].to_numpy()[validation_rows]
        validation, predicted = predict_probabilities(
            model, validation_images, run.options, run.options.skip_bad_images
        )
        test_images = run.test_table["image_path"].dropna().tolist()
        predictions = {
            "validation": validation,
            "validation_rows": validation_rows[predicted],
            "test": predict_probabilities(model, test_images, run.options)[0],
        }
        write_atomically(state.path("predictions.npz"), lambda path: np.savez(path, **predictions))
        state.done = True
        state.save()
        keras.backend.clear_session()  # Free this fold's model before the next one is built.
    with np.load(state.path("predictions.npz")) as predictions:
        history = pd.DataFrame(state.history).assign(fold=fold)
        return FoldResult(
            model_path, history, predictions["validation_rows"], predictions["validation"], predictions["test"]
        )


def train_fold(table, train_rows, validation_rows, settings, options, weights, state, strategy):
    """Both training phases for one split, resuming from `state`; returns the model with its best weights."""
    train_batches = make_batches(table, train_rows, settings, options, strategy, augment=True)
    validation_batches = (
        make_batches(table, validation_rows, settings, options, strategy) if len(validation_rows) else None
    )
    statistics_rows = np.random.default_rng(options.seed).permutation(train_rows)[: settings.batch_normalization_images]
    statistics_batches = make_batches(table, np.sort(statistics_rows), settings, options, strategy)
    batches = (train_batches, validation_batches, statistics_batches)
    with strategy.scope():  # Variables, including the optimizer's, are created on every replica.
        model = build_model(
            settings.image_size, weights, is_from_scratch(settings), settings.head_units, settings.head_dropout
        )
        for phase, first_epoch, end_epoch, learning_rate in training_phases(settings):
            if phase in state.finished_phases:
                continue
            if phase == 2:
                restore_best_weights(model, state)  # Fine-tuning starts from phase 1's best epoch.
                unfreeze_model(model, settings.fine_tune_layers)
            # Compiled again after unfreezing, so the change takes effect.
            epochs = end_epoch - first_epoch
            compile_model(
                model, learning_rate_schedule(learning_rate, len(train_batches), epochs, settings.final_learning_rate)
            )
            if worker_count(strategy) > 1:
                allow_multi_worker_training(model)
            print(
                f"phase {phase}: {phase_description(phase, settings)}, epochs {first_epoch + 1}-{end_epoch} at "
                f"learning rate {learning_rate:g} (warmed up over the first epoch, then cosine-decayed to "
                f"{settings.final_learning_rate:g} of it)"
            )
            run_phase(model, batches, phase, first_epoch, end_epoch, state)
        restore_best_weights(model, state)
    skipped = train_batches.skipped | getattr(validation_batches, "skipped", set())
    if skipped:
        print(
            f"--skip-bad-images: left out {len(skipped)} image(s) that could not be decoded: "
            + list_some(sorted(skipped))
        )
    return model


def make_batches(table, rows, settings, options, strategy, augment=False):
    """The streaming dataset for some labelled rows of a table; each batch feeds all of this worker's devices."""
    return ImageBatches(
        table["image_path"].to_numpy()[rows],
        settings.image_size,
        settings.batch_size * strategy.num_replicas_in_sync,  # Keras splits each batch over all replicas and workers.
        labels=table["label"].to_numpy()[rows],
        class_weights=settings.class_weights,
        augment=augment,
        augmentation=settings.augmentation,
        seed=options.seed,
        workers=options.workers,
        skip_bad_images=options.skip_bad_images,
    )


@functools.cache
def define_image_batches():
    """ImageBatches, as a global: a Keras class, so defined once import_tensorflow has imported Keras."""
    global ImageBatches

    class ImageBatches(keras.utils.PyDataset):
        """Streams batches from disk. Only paths and labels live in memory, so memory stays flat in dataset size.

        Yields (images,) for prediction, or (images, one-hot labels, sample weights) for training and validation.
        Training batches are shuffled and augmented (with `augmentation`, default AUGMENTATION), differently each epoch
        but repeatably from `seed`. Sample weights are the class weights of the labels (default: all 1).
        An image that cannot be decoded is remembered in `failed_path` (so the caller can name it) and stops the
        run, unless `skip_bad_images` is set: then it is counted in `skipped` and stands in the batch as a black image
        with sample weight 0, so that even a batch of bad images keeps its shape and teaches nothing.
        With `full_batches`, prediction batches (no labels) are padded with black images to batch_size, so that the
        model sees one shape and its predict function is traced once; the caller drops the padding's predictions.
        With `mirrored`, each prediction batch is followed by its images' mirror images (left and right swapped), in
        the same batch: the caller averages the two halves' predictions (mirror_averaged).
        """

        def __init__(
            self,
            image_paths,
            image_size,
            batch_size,
            labels=None,
            class_weights=None,
            augment=False,
            augmentation=None,
            seed=0,
            workers=1,
            skip_bad_images=False,
            full_batches=False,
            mirrored=False,
        ):
            super().__init__(workers=workers, use_multiprocessing=False, max_queue_size=2 * workers)
            self.image_paths = list(image_paths)
            self.image_size = image_size
            self.batch_size = batch_size
            self.labels = None if labels is None else np.asarray(labels)
            self.class_weights = np.asarray(class_weights or [1.0] * len(CLASS_NAMES), np.float32)
            self.augment = augment
            self.augmentation = augmentation
            self.seed = seed
            self.skip_bad_images = skip_bad_images
            self.full_batches = full_batches
            self.mirrored = mirrored
            self.skipped = set()
            self.failed_path = None
            self.start_epoch(0)

        def start_epoch(self, epoch):
            """Set the epoch (a resumed run starts mid-way); training rows get a fresh, seeded order each epoch."""
            self.epoch = epoch
            count = len(self.image_paths)
            self.order = (
                np.random.default_rng([self.seed, epoch]).permutation(count) if self.augment else np.arange(count)
            )

        def __len__(self):
            return math.ceil(len(self.image_paths) / self.batch_size)

        def load(self, row):
            """One image, augmented with a seed unique to (seed, epoch, row); None for a skipped bad image."""
            seed = (
                int(np.random.SeedSequence([self.seed, self.epoch, row]).generate_state(1)[0]) if self.augment else None
            )
            try:
                return read_image(self.image_paths[row], self.image_size, seed, self.augmentation)
            except UnreadableImageError:
                if not self.skip_bad_images:
                    self.failed_path = self.image_paths[row]
                    raise
                self.skipped.add(self.image_paths[row])
                return None

        def __getitem__(self, index):
            rows = self.order[index * self.batch_size : (index + 1) * self.batch_size]
            images = [self.load(row) for row in rows]
            usable = np.array([image is not None for image in images], np.float32)
            black = np.zeros((self.image_size, self.image_size, 3), np.float32)
            images = np.stack([black if image is None else image for image in images])
            images = keras.applications.resnet50.preprocess_input(images)
            if self.labels is None:
                if self.full_batches and len(images) < self.batch_size:
                    padding = np.zeros((self.batch_size - len(images), *images.shape[1:]), images.dtype)
                    images = np.concatenate([images, padding])
                if self.mirrored:
                    images = with_mirror_images(images)
                return (images,)
            labels = self.labels[rows]
            one_hot = np.eye(len(CLASS_NAMES), dtype=np.float32)[labels]
            return images, one_hot, self.class_weights[labels] * usable

        def on_epoch_end(self):
            self.start_epoch(self.epoch + 1)


def build_model(image_size, weights, from_scratch, head_units=HEAD_UNITS, head_dropout=HEAD_DROPOUT):
    """ResNet50 base with the seed's head: Flatten → Dense(head_units) → BatchNormalization → ReLU → Dropout → Dense(3).

    Pretrained (ImageNet or a weights file), the base is frozen with BatchNormalization in inference mode, as
    fine-tuning requires. From scratch (weights None), the whole network learns.
    """
    base = resnet50_base(image_size, weights, from_scratch)
    inputs = keras.Input(shape=(image_size, image_size, 3), name="image")
    if from_scratch:
        # From scratch the whole network learns, and BatchNormalization follows the phase: batch statistics
        # while training, the recalibrated population statistics at inference (see recalibrate_batch_normalization).
        features = base(inputs)
    else:
        base.trainable = False
        # training=False keeps BatchNormalization in inference mode in both phases, as fine-tuning requires.
        features = base(inputs, training=False)
    features = layers.Flatten()(features)
    # Normalising the Dense layer's outputs before the ReLU keeps its units alive. Its 8,192+ Flatten inputs
    # are all non-negative, so Adam, which moves every weight by about the learning rate, shifts a unit's
    # input for every image at once by many times its spread; without the normalisation such shifts switched
    # 96-100 % of the units off for good and the sample never learned (the convolutions are protected by theirs).
    features = layers.Dense(head_units, use_bias=False)(features)  # BatchNormalization's offset is the bias.
    features = layers.BatchNormalization()(features)
    features = layers.Activation("relu")(features)
    features = layers.Dropout(head_dropout)(features)
    # The softmax stays float32 even under mixed precision, so probabilities are exact enough to score. Its kernel
    # starts random, not at zero: a zero kernel passes no gradient back at first, and from scratch the photographs
    # of the learning check then stayed at 0.67 test accuracy through 8 epochs instead of reaching 1.00.
    outputs = layers.Dense(len(CLASS_NAMES), activation="softmax", dtype="float32", name="severity")(features)
    return keras.Model(inputs, outputs, name="spine_severity")


def unfreeze_model(model, layer_count):
    """Phase 2: make the base's last `layer_count` layers trainable, except BatchNormalization.

    A model trained from scratch is trainable throughout already; its phase 2 only lowers the learning rate.
    """
    base = model.get_layer("resnet50")
    if base.trainable:
        return
    base.trainable = True
    for index, layer in enumerate(base.layers):
        in_top = index >= len(base.layers) - layer_count
        layer.trainable = in_top and not isinstance(layer, layers.BatchNormalization)


def compile_model(model, learning_rate):
    """Adam on (class-weighted) categorical cross-entropy. Call again after changing `trainable`.

    learning_rate is a number or a schedule (learning_rate_schedule).
    """
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="categorical_crossentropy",
        metrics=["accuracy"],
    )


def training_phases(settings):
    """(phase, first epoch, end epoch, learning rate) for each phase that runs."""
    phases = [(1, 0, settings.epochs, settings.lr)]
    if settings.fine_tune_epochs > 0:
        end = settings.epochs + settings.fine_tune_epochs
        phases.append((2, settings.epochs, end, settings.fine_tune_lr))
    return phases


def phase_description(phase, settings):
    """What learns in a phase, for the log."""
    if is_from_scratch(settings):
        return "the whole network learns from scratch" if phase == 1 else "the whole network, at the lower rate"
    if phase == 1:
        return "base frozen"
    return f"last {settings.fine_tune_layers} base layers unfrozen (BatchNormalization frozen)"


def predict_probabilities(model, image_paths, options, skip_bad_images=False):
    """Softmax probabilities for the images, streamed in order, and the mask of the images predicted.

    An image that breaks stops the run with its name, unless skip_bad_images leaves it out (never for test rows).
    """
    if len(image_paths) == 0:
        return np.zeros((0, len(CLASS_NAMES))), np.ones(0, bool)
    batches = ImageBatches(
        image_paths,
        model.input_shape[1],
        options.batch_size,
        workers=options.workers,
        skip_bad_images=skip_bad_images,
        full_batches=True,  # A short last batch would trace the model's predict function a second time.
        mirrored=options.predict_mirrored,
    )
    try:
        probabilities = model.predict(batches, verbose=0)
        if options.predict_mirrored:
            probabilities = mirror_averaged(probabilities, options.batch_size)
        probabilities = probabilities[: len(image_paths)].astype(np.float64)
    except Exception:
        failure = decoding_failure([batches], "Restore the file and run again.")
        if failure:
            raise failure from None
        raise
    predicted = ~np.isin(image_paths, list(batches.skipped))
    return floored(probabilities)[predicted], predicted


def with_mirror_images(images):
    """(2n, height, width, channels): n images, then each of them mirrored (left and right swapped), for grading each
    crop as the mean of it and its mirror image (PREDICT_MIRRORED, mirror_averaged). predict_probabilities flips in
    the data, so that the model's own predict function serves each of its calls; a model wrapped around the severity
    model (mirror_averaging_model) would be traced again for each one (1.5-4 s of a ResNet50 on CPU)."""
    return np.concatenate([images, images[:, :, ::-1]])


def mirror_averaged(probabilities, group):
    """Each image's probabilities as the mean of the model's for it and for its mirror image, from predictions made in
    groups of `group` images, each group followed by its mirror images (with_mirror_images)."""
    classes = probabilities.shape[-1]
    return probabilities.reshape(-1, 2, group, classes).mean(axis=1).reshape(-1, classes)


def mirror_averaging_model(model):
    """A model that grades an image as the mean of `model`'s probabilities for it and for its mirror image, sharing
    `model`'s weights: for Grader, which builds it once and grades a study's few crops at a time, where the image and
    its mirror run as two branches side by side (benchmarks/localiser.py on 2 cores: grading mirrored adds 47-54 % to
    a hidden-test study's time this way, 57-59 % with the flip in the data)."""
    images = keras.Input(model.input_shape[1:])
    probabilities = (model(images) + model(keras.ops.flip(images, axis=2))) / 2
    return keras.Model(images, probabilities, name=f"{model.name}_mirror_averaged")


def floored(probabilities):
    """Probabilities raised to at least PREDICTION_FLOOR (never exactly 0: see PREDICTION_FLOOR), summing to 1."""
    probabilities = np.maximum(probabilities, PREDICTION_FLOOR)
    return probabilities / probabilities.sum(axis=1, keepdims=True)


@functools.lru_cache(maxsize=8)
def parameter_counts(image_size, fine_tune_layers, from_scratch, head_units):
    """(parameters, the most that learn in any phase) of the severity model, counted on a model built for it."""
    model = build_model(image_size, None, from_scratch, head_units)
    learning = [sum(math.prod(weight.shape) for weight in model.trainable_weights)]
    unfreeze_model(model, fine_tune_layers)
    learning.append(sum(math.prod(weight.shape) for weight in model.trainable_weights))
    parameters = model.count_params()
    keras.backend.clear_session()  # Leaves no trace in the names or the graph of the model that will train.
    return parameters, max(learning)


def checkpoint_bytes(settings, folds):
    """A generous estimate of the disk a run needs: each fold's model file, plus the best weights and the double
    backup (weights and Adam's two moments) that exist while a fold trains."""
    parameters, learning = parameter_counts(
        settings.image_size, settings.fine_tune_layers, is_from_scratch(settings), settings.head_units
    )
    model_file = 4 * (parameters + 2 * learning)  # float32 weights and Adam's moments.
    return folds * model_file + 3 * model_file


def refuse_low_disk(output_dir, settings, folds):
    """Refuse to start a run whose checkpoints would not fit on the output disk."""
    needed, free = checkpoint_bytes(settings, folds), shutil.disk_usage(output_dir).free
    if free < needed:
        raise InputError(
            f"--output-dir {output_dir}: {free / 1e9:.1f} GB free, but a run at {settings.image_size} px with "
            f"{folds} fold(s) needs about {needed / 1e9:.1f} GB for its models and checkpoints. "
            "Free some space or choose another folder."
        )


# == 10. metric and report =============================================================================================

# The competition metric: a class-weighted log loss per condition group, plus a per-study "any severe
# spinal stenosis" binary log loss, averaged with equal weight. Lower is better. Labels and predictions are
# long frames keyed by row_id, with one column per class; all-blank label rows are not scored.


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


def scored_rows(labels, predictions):
    """One row per labelled row_id with its study, group, severity, weight, log loss and severe probability."""
    labels = labels[labels[list(CLASS_NAMES)].notna().any(axis=1)]
    if labels.empty:
        raise InputError("the solution has no labelled rows to score")
    row_ids = labels["row_id"].reset_index(drop=True)
    probabilities = clip_and_normalise(aligned_probabilities(row_ids, predictions))
    true_classes = labels[list(CLASS_NAMES)].to_numpy().argmax(axis=1)
    return pd.DataFrame(
        {
            "row_id": row_ids,
            "study_id": study_ids(row_ids),
            "group": condition_groups(row_ids),
            "is_severe": true_classes == CLASS_NAMES.index("severe"),
            "weight": np.asarray(LABEL_WEIGHTS)[true_classes],
            "loss": -np.log(probabilities[np.arange(len(row_ids)), true_classes]),
            "severe_probability": probabilities[:, CLASS_NAMES.index("severe")],
        }
    )


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


def best_constants(labels, class_weights=LABEL_WEIGHTS):
    """The best constant for each location (condition and level) in `labels`, and overall under "".

    One constant per location is the baseline competitors quote: on the real train.csv it scores 0.790,
    against 0.930 for the plain frequencies (one global constant: 0.920).
    """
    constants = {"": best_constant_prediction(labels, class_weights)}
    for location, location_labels in labels.groupby(locations(labels["row_id"])):
        constants[location] = best_constant_prediction(location_labels, class_weights)
    return constants


def best_constant_prediction(labels, class_weights=LABEL_WEIGHTS):
    """The class distribution that minimises the weighted log loss over one-hot `labels`, as an array of 3.

    A constant p minimises Σ_c weight_c · count_c · −log p_c at p_c ∝ weight_c · count_c: the class
    frequencies times the metric's weights, renormalised. Weights (1, 1, 1) give the plain frequencies.
    The counts are smoothed by CONSTANT_SMOOTHING_ROWS of each class, so no probability is exactly 0 or 1.
    """
    counts = labels[list(CLASS_NAMES)].sum().to_numpy() + CONSTANT_SMOOTHING_ROWS
    weighted = counts * np.asarray(class_weights)
    return weighted / weighted.sum()


def constant_predictions(row_ids, constants):
    """Each row's location's constant, or the overall one for a location not seen in training."""
    return np.array(
        [constants.get(location, constants[""]) for location in locations(row_ids).astype(object).fillna("")]
    )


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
            name: {
                "precision": float(precision[k]),
                "recall": float(recall[k]),
                "f1": float(f1[k]),
                "support": int(support[k]),
            }
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
    print(
        f"\n  confusion matrix (rows: true, columns: predicted)\n  {'':<12}" + "".join(f"{n:>12}" for n in CLASS_NAMES)
    )
    for name, row in zip(CLASS_NAMES, metrics["confusion_matrix"]):
        print(f"  {name:<12}" + "".join(f"{count:>12}" for count in row))


def kept_epochs(history):
    """{fold: the epoch whose weights the fold kept}: the first with the lowest validation loss, as SaveProgress
    keeps it. Folds without a validation loss are left out."""
    if "val_loss" not in history:
        return {}
    return {
        fold: int(rows.loc[rows["val_loss"].idxmin(), "epoch"])
        for fold, rows in history.groupby("fold")
        if rows["val_loss"].notna().any()
    }


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

    kept = kept_epochs(history)
    curves, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, metric, title in zip(axes, ("loss", "accuracy"), ("loss (class-weighted cross-entropy)", "accuracy")):
        for fold, rows in history.groupby("fold"):
            line = axis.plot(rows["epoch"], rows[metric], "-o", label=f"fold {fold} training")[0]
            if f"val_{metric}" in rows:
                axis.plot(
                    rows["epoch"],
                    rows[f"val_{metric}"],
                    "--o",
                    color=line.get_color(),
                    label=f"fold {fold} validation",
                )
            if fold in kept:  # The epoch whose weights the fold kept: its best validation loss.
                kept_row = rows[rows["epoch"] == kept[fold]]
                axis.plot(
                    kept_row["epoch"],
                    kept_row[f"val_{metric}"],
                    "*",
                    markersize=16,
                    color=line.get_color(),
                    markeredgecolor="black",
                    label=f"fold {fold} kept: epoch {kept[fold]}",
                )
        if (history["phase"] == 2).any():
            axis.axvline(
                history.loc[history["phase"] == 2, "epoch"].min() - 0.5,
                color="gray",
                linestyle=":",
                label="fine-tuning starts",
            )
        axis.set(title=title, xlabel="epoch")
        axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        axis.legend(fontsize="small")

    matrix, axis = plt.subplots(figsize=(5, 4.5))
    counts = np.array(metrics["confusion_matrix"])
    axis.imshow(counts, cmap="Blues")
    axis.set(
        xticks=range(len(CLASS_NAMES)),
        yticks=range(len(CLASS_NAMES)),
        xticklabels=CLASS_NAMES,
        yticklabels=CLASS_NAMES,
        xlabel="predicted",
        ylabel="true",
        title="validation confusion matrix",
    )
    for (true, predicted), count in np.ndenumerate(counts):
        axis.text(
            predicted, true, count, ha="center", va="center", color="white" if count > counts.max() / 2 else "black"
        )

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


def severity_at_found_points(report, model_path, table, validation_rows, constants, options):
    """The severity score of the validation rows twice: on crops at the labelled points (as trained) and at the
    points the localiser found, each mixing the slices beside it and its best constant as a submission does
    (mixed_slices, chain_trust). The difference is what localisation costs."""
    found_dir = report.prepared / "found"
    shutil.rmtree(found_dir, ignore_errors=True)
    labelled = table.iloc[validation_rows].set_index("row_id")
    points = read_coordinates(report.validation_points)
    points = points[points["row_id"].isin(set(labelled.index))].reset_index(drop=True)
    with contextlib.redirect_stdout(io.StringIO()):  # The crops' progress: not this report's business.
        images_dir = report.competition_dir / "train_images"
        cache = report.slice_cache
        cut_crops(points, images_dir, found_dir, "images", PREPARE_CROP_MM, PREPARE_CROP_PIXELS, options.workers, cache)
    points = points[points["image_path"] != ""]
    if points.empty:
        return {}
    model = load_saved_model(model_path)
    at_crops = predict_probabilities(model, [str(found_dir / path) for path in points["image_path"]], options)[0]
    row_ids, at_found, _ = row_probabilities(points, at_crops, constants)
    at_labelled = predict_probabilities(model, labelled.loc[row_ids, "image_path"].tolist(), options)[0]
    keras.backend.clear_session()
    truth = labels_frame(row_ids, labelled.loc[row_ids, "label"])
    return {
        "rows": len(row_ids),
        "score_at_labelled_points": score_predictions(truth, probabilities_frame(row_ids, at_labelled))["score"],
        "score_at_found_points": score_predictions(truth, probabilities_frame(row_ids, at_found))["score"],
    }


def row_probabilities(test_table, image_probabilities, constants):
    """(row_ids in test.csv's order, their probabilities, the share of each that its crops make): the models' for a
    row with an image (the CROP_WEIGHT-weighted mean where a row lists several), the best constant for a row without
    one. Where a row's crops weigh less than 1 in all (a found point the localiser is unsure of: chain_trust), they
    make that share of its prediction, and its best constant the rest."""
    has_image = test_table["image_path"].notna().to_numpy()
    row_ids = pd.Series(pd.unique(test_table["row_id"]), name="row_id")
    position = pd.Index(row_ids).get_indexer(test_table["row_id"])[has_image]
    sums = np.zeros((len(row_ids), len(CLASS_NAMES)))
    weighted = crop_weights(test_table)[has_image, None] * np.asarray(image_probabilities).reshape(-1, len(CLASS_NAMES))
    np.add.at(sums, position, weighted)
    totals = crop_totals(test_table).to_numpy()  # In row_ids' order: groupby keeps the order of first appearance.
    probabilities = sums / np.where(totals > 0, totals, 1.0)[:, None]
    share = crop_shares(totals)
    hedged = share < 1.0
    if hedged.any():
        constant = constant_predictions(row_ids[hedged], constants)
        probabilities[hedged] = share[hedged, None] * probabilities[hedged] + (1.0 - share[hedged, None]) * constant
    return row_ids, probabilities, share


def crop_shares(totals):
    """The share of each row's prediction that its crops make, from their total weights: all of it from 1 on (weights
    are written to CROP_WEIGHT_DECIMALS, so a total short of 1 by their rounding is a whole one), else the total."""
    return np.where(totals >= 1.0 - 10.0 ** (1 - CROP_WEIGHT_DECIMALS), 1.0, totals)


def needs_constants(test_table):
    """Whether some row of a test table gets all or part of its prediction from its best constant (row_probabilities):
    a row without an image, or whose crops weigh less than 1 in all."""
    return bool((crop_shares(crop_totals(test_table).to_numpy()) < 1).any())


def crop_weights(test_table):
    """Each line's CROP_WEIGHT (1 where the table has none)."""
    return test_table[CROP_WEIGHT].to_numpy(float) if CROP_WEIGHT in test_table else np.ones(len(test_table))


def crop_totals(test_table):
    """Per row, in order of first appearance, the total weight of its crops that have an image."""
    weights = crop_weights(test_table) * test_table["image_path"].notna().to_numpy()
    return pd.Series(weights, index=test_table.index).groupby(test_table["row_id"].to_numpy(), sort=False).sum()


def print_constant_rows(shares, where):
    """One line for the rows that got their location's best constant, for want of a crop, and one for those that got
    part of it, for want of a sure point (chain_trust)."""
    count, hedged = int((shares == 0).sum()), int(((shares > 0) & (shares < 1)).sum())
    if count:
        print(f"{where}: {count} row(s) without an image get their location's best constant.")
    if hedged:
        print(
            f"{where}: {hedged} row(s) whose point the chain of levels moved off the localiser's own peak get part of "
            "their prediction from their location's best constant."
        )


def write_submission(row_ids, probabilities, path):
    """submission.csv: test.csv's row_ids in test.csv's order, finite probabilities that sum to 1."""
    probabilities = np.asarray(probabilities, np.float64)
    if not np.isfinite(probabilities).all():
        raise RuntimeError("The model produced non-finite probabilities; the submission was not written.")
    probabilities = probabilities / probabilities.sum(axis=1, keepdims=True)
    return write_csv(probabilities_frame(row_ids, probabilities), path)


# == 11. jobs ==========================================================================================================


def train(options):
    """The main path, from the data (the seed layout, or the competition's folder) to the submission and the report:
    prepare the training crops → train the level localiser → localise the test studies and crop them → train the
    severity model on each fold → predict → write the submission and the report. Without a competition folder the
    crops are given, and the run starts at the severity model."""
    started = time.time()
    competition = options.data_dir if is_competition_layout(options.data_dir) else None
    settings = severity_settings(options)  # Checked first: a bad config block is refused before any work.
    localiser_run = localiser_settings(options) if competition and options.localiser_epochs > 0 else None
    if competition:
        read_test_listing(competition, "train", options.no_test)  # Refused now, not after the localiser has trained.
        labelled = read_split_rows(competition, "train", None)[0]["row_id"]
        print_time_estimate(settings, localiser_run, labelled, options, competition)
        options.data_dir = prepare_training_split(competition, options, localiser_run)
    run = start_run(options, settings, localiser_run, competition)
    if not competition:
        print_time_estimate(settings, None, run.table["row_id"], options, None)
    if competition:
        localiser, run.localisation = localiser_for_run(
            competition, run.table, run.folds[0][1], run.localiser_settings, options, run.output_dir
        )
        if not options.no_test:
            prepare_test_split(competition, options.data_dir, localiser, options.workers, run.output_dir)
        run.test_table = load_test_table_unless(options.no_test, options.data_dir)
        keras.backend.clear_session()  # The localiser is done with: free it before the severity model is built.
    keras.utils.set_random_seed(options.seed)
    print_start_summary(run)
    results = [run_fold(run, fold, *rows) for fold, rows in enumerate(run.folds, start=1)]
    artifacts = write_training_outputs(run, results)
    shutil.rmtree(run.resume_dir)  # The run is complete: nothing left to resume.
    if not is_chief(run.strategy):
        shutil.rmtree(run.output_dir)  # A worker's copies only kept its steps in line with the chief's.
    print_end_summary(artifacts, [result.model_path for result in results], options.data_dir, time.time() - started)
    return 0


def start_run(options, settings, localiser_run, competition):
    """Check everything a training run needs before it spends time (the tables, the weights, the split, the devices
    and the output folder), then start its resumable state, or check that --resume continues one."""
    table = load_train_table(options.data_dir, options.skip_bad_images)
    test_table = None if competition else load_test_table_unless(options.no_test, options.data_dir)
    weights, weights_source = resolve_weights(settings.weights)
    folds = split_folds(table, options.folds, options.val_fraction, options.seed)
    strategy = choose_strategy(options.strategy)  # First: a multi-worker strategy must precede other TF work.
    policy = choose_precision(options.precision)
    output_dir = prepare_output_dir(options.output_dir if is_chief(strategy) else tempfile.mkdtemp())
    refuse_low_disk(output_dir, settings, len(folds))
    # The prior the models must beat, from all training labels: if anything, this flatters the prior.
    constants = best_constants(labels_frame(table["row_id"], table["label"]))
    run = TrainingRun(
        options, settings, localiser_run, table, test_table, folds, weights, weights_source, strategy, policy,
        output_dir, constants,
    )  # fmt: skip
    if open_run_state(run.resume_dir, options, [settings] + ([localiser_run] if localiser_run else [])):
        print(f"resuming at {resume_position(run.resume_dir, settings, len(folds), localiser=bool(localiser_run))}")
    return run


def load_test_table_unless(no_test, data_dir):
    """test.csv, checked as load_test_table checks it; with --no-test, an empty table."""
    return pd.DataFrame(columns=TEST_COLUMNS) if no_test else load_test_table(data_dir)


def warn_of_test_rows_in_training(table, test_table):
    """One line when test.csv repeats training rows: predicting them tells nothing about new data."""
    in_both = test_table["row_id"][test_table["row_id"].isin(table["row_id"])].drop_duplicates()
    if len(in_both):
        print(
            f"warning: {len(in_both)} test.csv row_id(s) also appear in train.csv ({list_some(in_both, limit=5)}): "
            "the test set repeats training rows, so predicting them tells nothing about new data."
        )


def write_training_outputs(run, results):
    """Report the validation results and write every output of a run but the models; returns {name: path}."""
    output_dir, table, constants = run.output_dir, run.table, run.constants
    history = pd.concat([result.history for result in results], ignore_index=True)
    history = history[["fold", *[column for column in history.columns if column != "fold"]]]
    artifacts = {"models": ", ".join(str(result.model_path) for result in results)}
    artifacts["history"] = write_csv(history, output_dir / "history.csv")
    rows = np.concatenate([result.validation_rows for result in results])
    if len(rows):
        row_ids, labels = table["row_id"].to_numpy()[rows], table["label"].to_numpy()[rows]
        oof = np.concatenate([result.validation_probabilities for result in results])
        metrics = evaluate(row_ids, labels, oof, constant_predictions(row_ids, constants))
        print_report(metrics)
        if run.localisation is not None:
            metrics["localisation"] = dict(run.localisation.metrics)
            if run.fold_count == 1 and run.localisation.validation_points is not None:
                severity = severity_at_found_points(
                    run.localisation, results[0].model_path, table, results[0].validation_rows, constants, run.options
                )
                metrics["localisation"]["severity"] = severity
                if severity:
                    print(
                        f"severity score on {severity['rows']} validation rows: "
                        f"{severity['score_at_labelled_points']:.4f} at the labelled points, "
                        f"{severity['score_at_found_points']:.4f} at the points the localiser found"
                    )
        artifacts["oof"] = write_csv(probabilities_frame(row_ids, oof), output_dir / "oof.csv")
        artifacts["metrics"] = write_json(metrics, output_dir / "metrics.json")
        artifacts.update(save_plots(history, metrics, output_dir))
    else:
        print("\nno validation rows (--val-fraction 0): the model is the last epoch's and nothing is scored.")
    if len(run.test_table):
        test_probabilities = np.mean([result.test_probabilities for result in results], axis=0)
        row_ids, probabilities, shares = row_probabilities(run.test_table, test_probabilities, constants)
        print_constant_rows(shares, "test.csv")
        artifacts["submission"] = write_submission(row_ids, probabilities, output_dir / "submission.csv")
    else:
        print("no test set (--no-test): no submission.csv written.")
    # config.json comes last and lists the run's outputs, so that predict and a later run know which files are one set.
    models = [result.model_path.name for result in results]
    outputs = models + [Path(path).name for name, path in artifacts.items() if name != "models"] + ["config.json"]
    config = run_config(run.options, run.settings, run.weights_source, constants) | {
        "models": models,
        "outputs": outputs,
    }
    if run.localiser_settings is not None and (output_dir / "localiser.keras").is_file():
        config["localiser_model"] = run.localiser_settings.recorded()
        config["outputs"] += [name for name in LOCALISER_OUTPUT_FILES if (output_dir / name).is_file()]
    artifacts["config"] = write_json(config, output_dir / "config.json")
    return artifacts


def run_config(options, settings, weights_source, constants):
    """config.json: the resolved options, the model's settings, where the weights came from, the priors, and the
    library versions."""
    return {
        "options": {name: str(value) if isinstance(value, Path) else value for name, value in vars(options).items()},
        "severity_model": settings.recorded(),
        "weights_source": weights_source,
        "best_constants": {location: constant.tolist() for location, constant in constants.items()},
        "versions": library_versions(),
    }


def library_versions():
    """The versions of Python and of the libraries a run's results depend on."""
    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "pandas": pd.__version__,
        "opencv": cv2.__version__,
        "scikit-learn": sklearn.__version__,
    }


def print_start_summary(run):
    """What the run found: data, class mix, device, weights, strategy and precision."""
    data_dir, table, test_table, strategy = run.options.data_dir, run.table, run.test_table, run.strategy
    counts = np.bincount(table["label"], minlength=len(CLASS_NAMES))
    mix = ", ".join(f"{name} {count} ({count / len(table):.0%})" for name, count in zip(CLASS_NAMES, counts))
    devices = ", ".join(sorted({device.device_type for device in tf.config.list_logical_devices()}))
    tests = f"{test_table['row_id'].nunique()} test rows" if len(test_table) else "no test set (--no-test)"
    print(f"data:    {data_dir.resolve()}: {len(table)} training rows ({mix}), {tests}")
    print(f"device:  {devices}")
    print(f"weights: {run.weights_source}")
    print(
        f"strategy: {strategy_name(strategy)}, {strategy.num_replicas_in_sync} replica(s), global batch "
        f"{run.settings.batch_size * strategy.num_replicas_in_sync}; precision: {run.policy} "
        f"({precision_policy(run.options.precision)[1]})"
        + ("" if is_chief(strategy) else f"; not the chief, so writing to scratch folder {run.output_dir}")
    )
    warn_of_test_rows_in_training(table, test_table)


def print_end_summary(artifacts, model_paths, data_dir, seconds):
    """Where everything went, and how to predict again without training."""
    print(f"\nfinished in {seconds:.0f} s. Wrote:")
    for name, path in artifacts.items():
        print(f"  {name:<18}{path}")
    models = " ".join(str(path) for path in model_paths)
    print(f"Predict again without training: python script.py predict --model {models} --data-dir {data_dir}")


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
        raise InputError(
            f"--output-dir {path}: cannot be written ({error.strerror}). Choose a writable folder."
        ) from None
    return path


# What a training run writes into --output-dir. config.json lists the files of its run under "outputs"; a new run
# first removes an earlier run's (that list, and these names for runs without one), so that the folder never
# holds two runs' outputs side by side.
RUN_OUTPUT_FILES = (
    "submission.csv",
    "model.keras",
    "history.csv",
    "config.json",
    "oof.csv",
    "metrics.json",
    "training_curves.png",
    "confusion_matrix.png",
)
LOCALISER_OUTPUT_FILES = ("localiser.keras", "localiser.json", "localisation.png")  # With a competition folder.
FOUND_POINTS_FILE = "test_coordinates.csv"  # predict's, beside its submission: where it graded each test row.


def listed_outputs(output_dir):
    """The file names that output_dir/config.json lists as its run's outputs (none without a readable list)."""
    try:
        outputs = json.loads((output_dir / "config.json").read_text()).get("outputs", [])
    except (OSError, ValueError, AttributeError):
        return []
    # Plain names only: a damaged or foreign list must not reach outside the folder.
    return [name for name in outputs if isinstance(name, str) and name and Path(name).name == name]


def remove_earlier_outputs(output_dir):
    """Remove the outputs an earlier training run left in output_dir, naming them; returns the names removed."""
    names = {
        *RUN_OUTPUT_FILES,
        *LOCALISER_OUTPUT_FILES,
        FOUND_POINTS_FILE,
        *listed_outputs(output_dir),
        *(path.name for path in output_dir.glob("model_fold*.keras")),
    }
    removed = sorted(name for name in names if (output_dir / name).is_file())
    for name in removed:
        (output_dir / name).unlink()
    if removed:
        print(
            f"note: removed an earlier run's outputs from {output_dir}: {', '.join(removed)} (a run's outputs are "
            "one set; choose another --output-dir to keep an earlier run)"
        )
    return removed


def predict(options):
    """Write submission.csv from a saved training run, without training. The image size comes from each model.

    --model names the run's output folder, or model file(s) in it: the folder is one unit, whose config.json holds
    the best constants and whose localiser.keras finds the points of the competition's test studies."""
    options.model = model_files(options.model)
    run_dir = options.model[0].parent
    points = None
    if is_competition_layout(options.data_dir):
        row_ids, probabilities, points = predict_competition(options, run_dir)
    else:
        row_ids, probabilities = predict_test_csv(options, run_dir)
    output_dir = prepare_output_dir(options.output_dir)  # Only now: a refused model leaves no folder behind.
    (output_dir / FOUND_POINTS_FILE).unlink(missing_ok=True)  # An earlier prediction's: never beside this one.
    if points is not None:
        print(f"wrote {write_csv(points, output_dir / FOUND_POINTS_FILE)}: the points found, each slice weighted")
    path = write_submission(row_ids, probabilities, output_dir / "submission.csv")
    print(f"wrote {path}: {len(row_ids)} rows from {len(options.model)} model(s)")
    return 0


def predict_test_csv(options, run_dir):
    """The seed layout: test.csv's crops graded by every model, one model in memory at a time; (row_ids,
    probabilities)."""
    test_table = load_test_table(options.data_dir)
    constants = {}
    if needs_constants(test_table):  # Rows without an image, or with unsure points, need the training run's priors.
        constants = saved_constants(run_dir / "config.json")
    test_images = test_table["image_path"].dropna().tolist()
    image_probabilities = []
    for path in options.model:  # One model in memory at a time.
        image_probabilities.append(predict_probabilities(load_saved_model(path), test_images, options)[0])
        keras.backend.clear_session()
    row_ids, probabilities, shares = row_probabilities(test_table, np.mean(image_probabilities, axis=0), constants)
    print_constant_rows(shares, "test.csv")
    return row_ids, probabilities


def predict_competition(options, run_dir):
    """The competition's test studies, each from its DICOM folder to its 25 rows (study_predictions), `--workers`
    studies at a time, so memory holds a few studies whatever their number; (row_ids, probabilities) in
    test_series_descriptions.csv's order of studies, and the points found (localised_rows, mixed)."""
    competition = options.data_dir
    descriptions = read_test_listing(competition, "predict")
    series = study_series(descriptions)
    study_ids = list(dict.fromkeys(descriptions["study_id"].str.strip()))
    localiser = find_localiser(options.localiser, options.model)
    constants = saved_constants(run_dir / "config.json")  # Up front: some rows have no crop in most test sets.
    grader = Grader([load_saved_model(path) for path in options.model], options.batch_size, options.predict_mirrored)
    images_dir = competition / "test_images"
    print(f"predicting {len(study_ids)} test studies in {competition}, {options.workers} at a time")
    with tempfile.TemporaryDirectory(prefix="crops-") as work_dir, decoding_pool(options.workers) as pool:
        pool.submit(int).result()  # Its processes start now, from this thread, before any other thread runs.

        def one(study_id):
            found = series.get(study_id, {})
            return study_predictions(images_dir, study_id, found, localiser, grader, constants, Path(work_dir), pool)

        results, started = [], time.time()
        with concurrent.futures.ThreadPoolExecutor(max_workers=options.workers) as executor:
            for number, result in enumerate(executor.map(one, study_ids), start=1):
                results.append(result)
                if number == len(study_ids) or number % max(1, len(study_ids) // 10) == 0:
                    print(f"predicted {number}/{len(study_ids)} studies ({time.time() - started:.0f} s)", flush=True)
    print_constant_rows(np.concatenate([result.shares for result in results]), "the test studies")
    unread = [name for result in results for name in result.unread_files]
    if unread:
        print(f"{len(unread)} file(s) could not be read, so their crops were not graded: {list_some(unread)}")
    return (
        pd.concat([result.row_ids for result in results], ignore_index=True),
        np.concatenate([result.probabilities for result in results]),
        pd.concat([result.points for result in results], ignore_index=True),
    )


@dataclass
class StudyPredictions:
    """One study's 25 rows and their probabilities; how many rows got their best constant, for want of a crop; and
    the points found (localised_rows, mixed)."""

    row_ids: "pd.Series"  # Quoted, as TrainingRun's tables.
    probabilities: np.ndarray
    shares: np.ndarray  # of each row's prediction, from its crops; the rest is its best constant (row_probabilities)
    points: "pd.DataFrame"
    unread_files: list  # missing or undecodable DICOMs that a crop needed


def study_predictions(images_dir, study_id, series_by_kind, localiser, grader, constants, work_dir, pool=None):
    """One study, from its DICOM folder (images_dir/study_id) to its 25 predictions: read its series, find its points
    (localise_study), cut crops there as prepare cuts them (each point's slice and the slices its severity mixes in),
    grade them with every severity model, and mix each row's crops by their weights. A row the localiser could not
    place gets its location's best constant. The crops live in work_dir only while the study is graded. With a
    decoding_pool, the DICOMs are decoded in its processes while this thread waits."""
    pool = pool or InlinePool()
    rows = submission_rows(pd.DataFrame({"study_id": [study_id]})).assign(image_path=np.nan)
    study_dir, points, unread = work_dir / study_id, localised_rows({}, mixed=True), []
    if localiser is not None and series_by_kind:
        size = localiser.model.input_shape[1]
        reading = pool.submit(read_localiser_study, images_dir, study_id, series_by_kind, size)
        study = result_of_worker(reading, [reading], [str(images_dir / study_id)])
        with grader.lock:  # TensorFlow one call at a time; other threads meanwhile read and crop.
            points = localised_rows({study_id: localise_study(localiser, study)}, mixed=True)
        study_dir.mkdir(parents=True, exist_ok=True)
        points_path = write_csv(points, study_dir / "points.csv")
        rows = submission_rows(rows[["row_id"]].assign(study_id=study_id), read_coordinates(points_path))
        rows["crop"] = crop_names(rows)
        stacks = volume_stacks(study_id, study.volumes)  # Just read: their files' tags are not read again.
        tasks = crop_tasks(rows, images_dir, study_dir, stacks)
        for future in [pool.submit(crop_series, task, PREPARE_CROP_MM, PREPARE_CROP_PIXELS) for task in tasks]:
            result = result_of_worker(future, [future], [str(images_dir / study_id)])
            unread += result.missing_files + result.undecodable_files
        paths = study_dir / (rows["crop"].fillna("") + ".png")
        rows["image_path"] = [str(path) if path.is_file() else np.nan for path in paths]
    probabilities = grader.probabilities(rows["image_path"].dropna().tolist())
    shutil.rmtree(study_dir, ignore_errors=True)
    return StudyPredictions(*row_probabilities(rows, probabilities, constants), points, unread)


@dataclass
class Grader:
    """A run's severity models, all in memory, grading one study's crops at a time: the mean of their probabilities,
    each floored as predict_probabilities floors them, and with `mirrored` each crop graded as predict_probabilities
    grades it with --predict-mirrored. `lock` keeps TensorFlow's calls one at a time."""

    models: list
    batch_size: int
    mirrored: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self):
        if self.mirrored:
            self.models = [mirror_averaging_model(model) for model in self.models]

    def probabilities(self, image_paths):
        if not image_paths:
            return np.zeros((0, len(CLASS_NAMES)))
        per_model = []
        for model in self.models:
            images = np.stack([read_image(path, model.input_shape[1]) for path in image_paths])
            images = keras.applications.resnet50.preprocess_input(images)
            with self.lock:
                per_model.append(floored(np.asarray(predict_in_batches(model, images, self.batch_size)[0], float)))
        return np.mean(per_model, axis=0)


def model_files(paths):
    """The severity models that --model names: each path as given, or for a training run's output folder the models
    its config.json lists (never its localiser).

    Each must be a .keras file (a zip archive holding a Keras model's config.json and metadata.json); checked
    cheaply, before anything is written.
    """
    models = []
    for path in paths:
        if path.is_dir():
            listed = [path / name for name in run_models(path)]
            if not listed:
                raise InputError(
                    f"--model {path}: is a folder, not a model file, and holds no config.json of a training run "
                    "that lists its models. Pass the .keras file(s), or a training run's output folder."
                )
            print(f"--model {path}: the run's {len(listed)} model(s), as its config.json lists them")
            models += listed
        else:
            models.append(path)
    for path in models:
        refuse_unreadable_file(path, "model file", option="--model ")
        if not zipfile.is_zipfile(path):
            raise InputError(f"--model {path}: not a Keras model file (a .keras file is a zip archive).")
        with zipfile.ZipFile(path) as archive:
            members = set(archive.namelist())
        if not {"config.json", "metadata.json"} <= members:
            raise InputError(
                f"--model {path}: a zip archive, but not a Keras model file (it has no config.json and metadata.json)."
                " Pass a .keras file that a training run saved."
            )
    return models


def run_models(output_dir):
    """The severity models of the training run in output_dir, by name, as its config.json lists them."""
    try:
        listed = json.loads((output_dir / "config.json").read_text()).get("models")
    except (OSError, ValueError, AttributeError):
        listed = None
    if not isinstance(listed, list):  # A run from before config.json named its models: its .keras outputs.
        listed = [name for name in listed_outputs(output_dir) if name.endswith(".keras")]
    return [name for name in listed if isinstance(name, str) and name not in LOCALISER_OUTPUT_FILES]


def saved_constants(config_path):
    """The best constants a training run saved in its config.json, refused clearly when they cannot be read."""
    if not config_path.is_file():
        raise InputError(
            f"{config_path}: file not found; test rows without a crop need the best constants that the training run "
            "wrote there. Attach the run's whole output folder."
        )
    try:
        saved = json.loads(config_path.read_text())["best_constants"]
        return {key: np.array(value, dtype=float) for key, value in saved.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise InputError(
            f"{config_path}: not a training run's config.json with best_constants ({type(error).__name__}: "
            f"{error}). Restore the file the training run wrote."
        ) from None


def find_localiser(option, models):
    """The level localiser that places a competition's test points: --localiser PATH, else localiser.keras in the
    training run's folder, beside its model. --localiser none gives every row its best constant, on purpose; without
    it, finding none is refused, as such a submission would score like the prior with nothing to say so."""
    if option is not None and str(option).lower() == "none":
        print(
            "--localiser none: no level localiser, so every test row gets its location's best constant (a "
            "submission that scores like the prior), as asked."
        )
        return None
    if option is not None:
        return Localiser.load(option)
    places = list(dict.fromkeys(model.parent / "localiser.keras" for model in models))
    found = next((place for place in places if place.is_file()), None)
    if found is None:
        raise InputError(
            f"no level localiser found (looked for {list_some(places)}). The competition's test studies have no "
            "label coordinates, so without it every row would get its location's best constant. Attach the training "
            "run's whole output folder (localiser.keras and localiser.json beside model.keras), pass --localiser "
            "PATH, or --localiser none to submit the best constants on purpose."
        )
    print(f"localiser: {found}, from the training run's folder")
    return Localiser.load(found)


def is_competition_layout(data_dir):
    """The competition's own folder (DICOMs and a wide train.csv) rather than the seed layout."""
    return (data_dir / "train_series_descriptions.csv").is_file() or (
        data_dir / "test_series_descriptions.csv"
    ).is_file()


def read_test_listing(competition_dir, command, no_test=False):
    """The test studies a run must predict (read_series_descriptions), read before anything is prepared or trained,
    so that a missing, unreadable or empty test_series_descriptions.csv is refused at once; None with --no-test."""
    if no_test:
        return None
    listing = competition_dir / "test_series_descriptions.csv"
    without_test = " To train without a test set, add --no-test." if command == "train" else ""
    if not listing.is_file():
        raise InputError(f"{listing}: file not found; it lists the test studies to predict.{without_test}")
    try:
        return read_series_descriptions(competition_dir, "test")
    except InputError as error:
        raise InputError(f"{error}{without_test}") from None


def prepare_split(competition_dir, prepared, split, coordinates, workers, cache=None):
    """Turn one split of a competition folder into the seed layout in `prepared` (kept, so reruns are quick), print
    what was done; returns the prepared folder. With the split's SliceCache, it is filled in the same pass."""
    print(f"{competition_dir} holds the competition's layout: preparing its {split} split in {prepared}")
    print_prepare_summary(
        prepare_competition(competition_dir, prepared, split, coordinates, workers=workers, cache=cache)
    )
    return prepared


def prepare_training_split(competition_dir, options, localiser_run):
    """The training studies' crops in OUTPUT/prepared; with a localiser to train, its slice cache is filled in the same
    pass over the DICOMs (cache_and_crop_study). Returns the prepared folder."""
    cache = None
    if localiser_run:
        cache = split_slice_cache(competition_dir, options.output_dir, "train", localiser_run.localiser_image_size)
    return prepare_split(competition_dir, options.output_dir / "prepared", "train", None, options.workers, cache)


def prepare_test_split(competition_dir, prepared, localiser, workers, output_dir):
    """The test studies, which have no label coordinates, cropped where the localiser finds their points (every row
    its best constant without one): prepared/test.csv with all 25 rows of every study. Their slices are cached in
    output_dir, so each DICOM is read once to localise and at most once more for a crop."""
    coordinates = cache = None
    if localiser is not None:
        coordinates = prepared / "test_coordinates.csv"
        cache = split_slice_cache(competition_dir, output_dir, "test", localiser.model.input_shape[1])
        localise_split(localiser, competition_dir, "test", coordinates, workers, mixed=True, cache_dir=cache.directory)
    return prepare_split(competition_dir, prepared, "test", coordinates, workers, cache)


def run_score(solution_path, submission_path, only_submitted=False):
    """`score`: print the components, then the scores as one JSON object on the last line; return them.

    Every labelled solution row must be predicted, unless only_submitted scores just the rows the submission has
    (an oof.csv holds only the validated rows), saying how many were left out. Submission rows that the solution
    lacks are not scored, and counted.
    """
    labels, predictions = read_solution(solution_path), read_submission(submission_path)
    labels = labels[labels[list(CLASS_NAMES)].notna().any(axis=1)]
    if labels.empty:
        raise InputError(f"{solution_path}: no labelled rows to score. Check that it is the solution file.")
    extra = predictions["row_id"][~predictions["row_id"].isin(labels["row_id"])]
    if len(extra):
        print(
            f"note: {submission_path}: {len(extra)} row(s) whose row_id has no label in the solution were not scored: "
            + list_some(extra, limit=5)
        )
    missing = labels["row_id"][~labels["row_id"].isin(predictions["row_id"])]
    if len(missing) and not only_submitted:
        raise InputError(
            f"{submission_path}: lacks {len(missing)} of the {len(labels)} labelled row_ids of {solution_path}: "
            f"{list_some(missing)}. Predict every row, or pass --only-submitted to score only the rows it has "
            "(as for an oof.csv)."
        )
    if only_submitted:
        if len(missing) == len(labels):
            raise InputError(f"{submission_path}: predicts none of the labelled row_ids of {solution_path}.")
        labels = labels[labels["row_id"].isin(predictions["row_id"])]
        print(
            f"--only-submitted: scoring the {len(labels)} labelled row(s) the submission predicts; "
            f"{len(missing)} labelled row(s) of the solution left out."
        )
    scores = score_predictions(labels, predictions)
    print(format_score_table(scores))
    print(json.dumps(scores))
    return scores


# == 12. command line ==================================================================================================


def run_command(command, options):
    """Dispatch to one command. TensorFlow is imported only for a command that runs a model."""
    if command in ("train", "predict", "localise"):
        import_tensorflow()
    if command in ("train", "predict"):
        options.data_dir = resolve_data_dir(options.data_dir, command)
        options.output_dir = resolve_output_dir(options.output_dir)
    if command == "train":
        return train(options)
    if command == "predict":
        return predict(options)
    if command == "localise":
        localiser = Localiser.load(options.localiser)
        localise_split(localiser, options.competition_dir, options.split, options.out, options.workers)
        return 0
    if command == "prepare":
        coordinates = options.coordinates
        if coordinates is None and options.localiser is not None and options.split == "test":
            coordinates = options.out_dir / "test_coordinates.csv"
            import_tensorflow()
            localiser = Localiser.load(options.localiser)
            localise_split(localiser, options.competition_dir, "test", coordinates, options.workers, mixed=True)
        print_prepare_summary(
            prepare_competition(
                options.competition_dir,
                options.out_dir,
                options.split,
                coordinates,
                options.crop_mm,
                options.crop_pixels,
                options.workers,
            )
        )
        return 0
    if command == "score":
        run_score(options.solution, options.submission, options.only_submitted)
        return 0
    raise AssertionError(f"unhandled command {command}")


def main(argv=None):
    """Run one command. Returns the exit code: 0 done, 2 bad input, 130 interrupted (resumable)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command, options = parse_arguments(argv)
    # Ctrl-C stops training at the end of a batch, with its state saved; signals belong to the main thread.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous_handler = signal.signal(signal.SIGINT, stop_at_batch_end_on_interrupt) if in_main_thread else None
    try:
        start_decoding_workers(command, options)
        import_pandas()
        return run_command(command, options)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "\nstopped by Ctrl-C."
            + (
                " The state after the last finished epoch is saved; continue with:\n"
                f"  python script.py {shlex.join(argv if '--resume' in argv else [*argv, '--resume'])}"
                if command == "train"
                else ""
            ),
            file=sys.stderr,
        )
        return 130
    finally:
        discard_started_workers()
        interrupt_requested.clear()
        if in_main_thread:
            signal.signal(signal.SIGINT, previous_handler)


def on_kaggle():
    """Kaggle notebooks mount attached data under /kaggle/input."""
    return (KAGGLE_ROOT / "input").is_dir()


def kaggle_input_files(name, depth):
    """Paths named `name` in the data attached under /kaggle/input, at most `depth` folders deep, shallowest first.
    Attached datasets sit a few folders deep; the image trees below them are not walked."""
    for level in range(1, depth + 1):
        yield from sorted((KAGGLE_ROOT / "input").glob("/".join(["*"] * level) + "/" + name))


def find_kaggle_data_dir(split):
    """(the data attached under /kaggle/input for a split, one line saying what was found and what was passed over).

    The competition, found by its {split}_series_descriptions.csv, whenever it is attached: on Kaggle's rerun of a
    submission notebook its listing names the hidden test studies. A dataset in the seed layout ({split}.csv with an
    image_path column, such as a training run's prepared/ uploaded with its models) only when no competition is."""
    competitions = [path.parent for path in kaggle_input_files(f"{split}_series_descriptions.csv", depth=3)]
    seed_layouts = [path.parent for path in kaggle_input_files(f"{split}.csv", depth=3) if has_image_path(path)]
    if competitions:
        found = competitions[0]
        line = f"kaggle:  using the competition in {found} (its {split}_series_descriptions.csv)"
        if seed_layouts:
            line += (
                f"; passed over the seed-layout data in {list_some(seed_layouts, limit=3)}: with the competition "
                "attached, its own listing says which studies to " + ("predict" if split == "test" else "train on")
            )
    elif seed_layouts:
        found = seed_layouts[0]
        line = f"kaggle:  using the seed-layout data in {found} (no competition is attached)"
    else:
        return None, None
    return found, line + ". --data-dir chooses another."


def has_image_path(path):
    """True for a seed-layout CSV: its header names image_path (the competition's own train.csv is wide)."""
    with path.open(encoding="utf-8", errors="replace") as file:
        return "image_path" in file.readline()


def resolve_data_dir(option, command):
    """--data-dir, else the current folder, else (on Kaggle) the data found under /kaggle/input."""
    if option is not None:
        return Path(option)
    split = "test" if command == "predict" else "train"
    if on_kaggle() and not Path(f"{split}.csv").is_file():
        found, line = find_kaggle_data_dir(split)
        if found is not None:
            print(line)
            return found
    return Path(".")


def resolve_output_dir(option):
    """--output-dir, else /kaggle/working on Kaggle (the folder it keeps), else the current folder."""
    if option is not None:
        return Path(option)
    return KAGGLE_ROOT / "working" if on_kaggle() else Path(".")


COMMANDS = ("train", "predict", "score", "prepare", "localise")


def integer_at_least(minimum, reason=""):
    """An argparse type: a whole number no smaller than `minimum`."""

    def integer(text):
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}{reason}, got {text}")
        return value

    return integer


positive_int = integer_at_least(1)
non_negative_int = integer_at_least(0)
pixels_at_least_32 = integer_at_least(32, " (ResNet50's smallest input)")


def positive_number(text):
    """An argparse type: a finite number above 0 (a learning rate, a crop size in millimetres)."""
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def seed_number(text):
    """An argparse type: a seed NumPy accepts, 0 to 2**32 - 1."""
    value = int(text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be between 0 and {2**32 - 1}, got {text}")
    return value


def fraction(text):
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def three_positive_weights(text):
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        values = ()
    if len(values) != len(CLASS_NAMES) or not all(math.isfinite(value) and value > 0 for value in values):
        raise argparse.ArgumentTypeError(f"needs {len(CLASS_NAMES)} positive numbers like 1,2,4, got {text}")
    return values


def choices_help(choices):
    """Help text for a {choice: meaning} table."""
    return "; ".join(f"{choice}: {meaning}" for choice, meaning in choices.items())


def share(text):
    """An argparse type: a number from 0 to 1."""
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be from 0 to 1, got {text}")
    return value


# The models' settings that build_parser gives no option of its own: each is an option named as its config variable
# (--head-units sets HEAD_UNITS), so every setting has one name. The dicts (the augmentations) are edited in § 1.
SETTING_OPTIONS = {
    "final_learning_rate": (share, "the severity model's rate decays to this share of each phase's"),
    "batch_normalization_images": (positive_int, "from scratch: images that reset BatchNormalization each epoch"),
    "head_units": (positive_int, "the head's Dense units"),
    "head_dropout": (fraction, "the head's dropout"),
    "localiser_slices_per_study": (positive_int, "the localiser's slices per study, series kind and epoch"),
    "localiser_min_slices_per_epoch": (non_negative_int, "the localiser's least slices an epoch"),
    "localiser_labelled_share": (share, "the share of them at or next to a labelled slice"),
    "localiser_batch_size": (positive_int, "the localiser's slices per step"),
    "localiser_learning_rate": (positive_number, "the localiser's Adam rate"),
    "localiser_final_learning_rate": (share, "the localiser's rate decays to this share of it"),
    "localiser_averaged_share": (share, "the share of its last epochs whose weights the localiser keeps the mean of"),
    "localiser_intensity_share": (share, "the share of its slices whose intensities are varied"),
    "localiser_width": (positive_int, "channels of the localiser's feature pyramid"),
    "localiser_coordinate_loss_weight": (positive_number, "its coordinates' weight in its loss, against presence"),
    "localiser_heatmap_sigma_cells": (positive_number, "its heatmap target's Gaussian, in cells"),
    "localiser_peak_window": (non_negative_int, "cells around a heatmap peak that a found point averages"),
}


def build_parser(command):
    """The argparse parser for one command; `train` is the default command."""
    program = "script.py" if command == "train" else f"script.py {command}"
    parser = argparse.ArgumentParser(
        prog=program,
        description=__doc__.split("\n\n")[1] if command == "train" else None,
        epilog="Other commands: predict, score, prepare, localise (see `python script.py COMMAND --help`)."
        if command == "train"
        else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # A notebook kernel's own `--f=kernel.json` must not pass for --folds.
    )
    if command == "train":
        add_common_options(parser)
        parser.add_argument(
            "--image-size", type=pixels_at_least_32, default=IMAGE_SIZE, help="pixels, square (default: %(default)s)"
        )
        parser.add_argument(
            "--epochs",
            type=positive_int,
            default=EPOCHS,
            help="phase 1 epochs: pretrained, the base is frozen and the head learns; with --weights none, the "
            "whole network learns from scratch (default: %(default)s)",
        )
        parser.add_argument(
            "--fine-tune-epochs",
            type=non_negative_int,
            default=FINE_TUNE_EPOCHS,
            help="phase 2 epochs at --fine-tune-lr: pretrained, the last --fine-tune-layers base layers learn too; "
            "from scratch, the whole network goes on; 0 skips it (default: %(default)s)",
        )
        parser.add_argument(
            "--fine-tune-layers",
            type=positive_int,
            default=FINE_TUNE_LAYERS,
            help="base layers that learn in phase 2 with pretrained weights; BatchNormalization layers stay "
            "frozen (default: %(default)s)",
        )
        parser.add_argument(
            "--lr", type=positive_number, default=LEARNING_RATE, help="phase 1 learning rate (default: %(default)g)"
        )
        parser.add_argument(
            "--fine-tune-lr",
            type=positive_number,
            default=FINE_TUNE_LEARNING_RATE,
            help="phase 2 learning rate (default: %(default)g)",
        )
        parser.add_argument(
            "--weights",
            default=WEIGHTS,
            help="imagenet, none (from scratch), or a path to ResNet50 notop weights, trained like ImageNet's "
            "(default: %(default)s)",
        )
        default_weights = ",".join(f"{weight:g}" for weight in CLASS_WEIGHTS)
        as_metric = ", the metric's" if tuple(CLASS_WEIGHTS) == LABEL_WEIGHTS else ""
        parser.add_argument(
            "--class-weights",
            type=three_positive_weights,
            default=CLASS_WEIGHTS,
            help="loss weight per true class normal_mild,moderate,severe; 1,1,1 turns weighting off "
            f"(default: {default_weights}{as_metric})",
        )
        parser.add_argument(
            "--val-fraction",
            type=fraction,
            default=VAL_FRACTION,
            help="share held out for validation, whole studies (default: %(default)s)",
        )
        parser.add_argument(
            "--folds",
            type=positive_int,
            default=FOLDS,
            help="K > 1 trains K models on grouped, stratified folds and averages them (default: %(default)s)",
        )
        parser.add_argument("--seed", type=seed_number, default=SEED, help="random seed (default: %(default)s)")
        parser.add_argument(
            "--strategy",
            choices=STRATEGIES,
            default=STRATEGY,
            help="tf.distribute strategy: " + choices_help(STRATEGIES) + " (default: %(default)s)",
        )
        parser.add_argument(
            "--precision",
            choices=PRECISIONS,
            default=PRECISION,
            help="dtype policy: " + choices_help(PRECISIONS) + " (default: %(default)s)",
        )
        parser.add_argument(
            "--resume",
            action="store_true",
            help="continue an interrupted run in --output-dir from its last finished epoch",
        )
        parser.add_argument(
            "--skip-bad-images",
            action="store_true",
            help="drop training rows whose image is missing or cannot be decoded (counted), instead of stopping",
        )
        parser.add_argument(
            "--localiser-epochs",
            type=non_negative_int,
            default=LOCALISER_EPOCHS,
            help=f"with a competition folder, the level localiser's epochs (each: {LOCALISER_SLICES_PER_STUDY} "
            "slices per study and series kind); 0 trains none, and test rows keep their best constant "
            "(default: %(default)s)",
        )
        parser.add_argument(
            "--localiser-image-size",
            type=pixels_at_least_32,
            default=LOCALISER_IMAGE_SIZE,
            help="the localiser's input, pixels, square (default: %(default)s)",
        )
        for name, (kind, meaning) in SETTING_OPTIONS.items():
            option = "--" + name.replace("_", "-")
            parser.add_argument(
                option, type=kind, default=globals()[name.upper()], help=f"{meaning} (default: %(default)s)"
            )
        parser.add_argument(
            "--no-test",
            action="store_true",
            help="train and validate without a test set (no test.csv needed, no submission.csv written)",
        )
    elif command == "predict":
        add_common_options(parser)
        parser.add_argument(
            "--model",
            nargs="+",
            required=True,
            type=Path,
            help="a training run's output folder, or saved model(s) (.keras) in it; several are averaged, as a "
            "K-fold run's are",
        )
        parser.add_argument(
            "--localiser",
            type=Path,
            help="with a competition folder, the level localiser that places the test points (default: "
            "localiser.keras in the training run's folder, beside the first --model); none: no localiser, every "
            "test row gets its location's best constant, on purpose",
        )
    elif command == "localise":
        parser.add_argument(
            "--localiser", "--model", required=True, type=Path, help="the level localiser (localiser.keras)"
        )
        parser.add_argument("--competition-dir", required=True, type=Path, help="the competition's folder")
        parser.add_argument("--split", choices=("train", "test"), default="test", help="(default: %(default)s)")
        parser.add_argument(
            "--out", required=True, type=Path, help="the CSV to write, in train_label_coordinates.csv's format"
        )
        add_workers_option(parser)
    elif command == "prepare":
        parser.add_argument(
            "--competition-dir",
            required=True,
            type=Path,
            help="the competition's folder: train.csv, *_series_descriptions.csv, *_images/",
        )
        parser.add_argument("--out-dir", required=True, type=Path, help="where the seed layout is written")
        parser.add_argument("--split", choices=("train", "test"), default="train", help="(default: %(default)s)")
        parser.add_argument(
            "--coordinates",
            type=Path,
            help="label coordinates CSV (default: train_label_coordinates.csv for train; for test, the points "
            "--localiser finds, else none, so test rows get an empty image_path)",
        )
        parser.add_argument(
            "--localiser", type=Path, help="with --split test and no --coordinates: the level localiser to place them"
        )
        parser.add_argument(
            "--crop-mm",
            type=positive_number,
            default=PREPARE_CROP_MM,
            help="crop side in millimetres (default: %(default)s)",
        )
        parser.add_argument(
            "--crop-pixels",
            type=positive_int,
            default=PREPARE_CROP_PIXELS,
            help="crop side in pixels (default: %(default)s)",
        )
        add_workers_option(parser)
    elif command == "score":
        parser.add_argument(
            "--solution",
            required=True,
            type=Path,
            help="labels: row_id + one-hot columns, or the competition's wide train.csv",
        )
        parser.add_argument("--submission", required=True, type=Path, help="row_id, normal_mild, moderate, severe")
        parser.add_argument(
            "--only-submitted",
            action="store_true",
            help="score only the solution rows the submission predicts (as in an oof.csv), and say how many were "
            "left out; without it, every labelled solution row must be predicted",
        )
    return parser


def add_common_options(parser):
    """Options that train and predict share."""
    parser.add_argument(
        "--data-dir",
        default=DATA_DIR,
        help="folder with train.csv/test.csv and their images (default: the current folder; "
        "on Kaggle, the data attached under /kaggle/input)",
    )
    parser.add_argument(
        "--output-dir",
        default=OUTPUT_DIR,
        help="where outputs are written (default: the current folder; /kaggle/working on Kaggle)",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=BATCH_SIZE,
        help="images per step on each device; the global batch is this × the replicas (default: %(default)s)",
    )
    parser.add_argument(
        "--predict-mirrored",
        action=argparse.BooleanOptionalAction,
        default=PREDICT_MIRRORED,
        help="grade each crop and its mirror image and average the two (default: %(default)s)",
    )
    add_workers_option(parser)


def add_workers_option(parser):
    parser.add_argument(
        "--workers",
        type=positive_int,
        default=WORKERS,
        help="processes decoding DICOMs, threads reading images (default: %(default)s, the CPU count)",
    )


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


if __name__ == "__main__":
    exit_code = main()
    if exit_code and not in_notebook():
        sys.exit(exit_code)
