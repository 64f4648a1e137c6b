"""
The naive design this project started from (the seed), reproduced so the benchmarks can compare against it.

Every image is read with OpenCV into one in-RAM float64 array (`np.array(images) / 255.0`), labels stay in RAM,
Keras' ImageDataGenerator (scipy-based) augments the training batches, and the same ResNet50 model as script.py
trains in the same two phases, then predicts the in-RAM test array. Memory therefore grows with the number of
images: the float64 array, the train/validation split's copy of it and the float32 copy ImageDataGenerator.flow
makes come to about 2.9 MB per 224-px image (measured: 0.24 MB per 64-px image, 2.4 times the float64 size).

    python benchmarks/naive.py --data-dir D --output-dir O --image-size 64 --epochs 1 --fine-tune-epochs 0
"""

import argparse
import sys
import warnings
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import tensorflow as tf
from sklearn.model_selection import train_test_split

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))

import script  # noqa: E402  (needs the path set up above)

script.import_tensorflow()  # Keras, and script.py's Keras classes, which a plain import leaves out.

# ImageDataGenerator is deprecated; its warnings would bury the training log.
warnings.filterwarnings("ignore", category=DeprecationWarning)


def load_images(image_paths, image_size):
    """All images, read and resized, as one float64 array in [0, 1]: the seed's in-RAM dataset."""
    images = []
    for path in image_paths:
        images.append(cv2.resize(cv2.imread(path), (image_size, image_size)))
    return np.array(images) / 255.0


def augmenter():
    """The seed's augmentation (the configuration script.py keeps as AUGMENTATION): ImageDataGenerator, which
    applies each transform with scipy on the CPU."""
    return tf.keras.preprocessing.image.ImageDataGenerator(**script.AUGMENTATION)


def parse_arguments(argv):
    parser = argparse.ArgumentParser(description="The seed's in-RAM training run, for benchmarks.")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--image-size", type=int, default=script.IMAGE_SIZE)
    parser.add_argument("--batch-size", type=int, default=script.BATCH_SIZE)
    parser.add_argument("--epochs", type=int, default=script.EPOCHS)
    parser.add_argument("--fine-tune-epochs", type=int, default=script.FINE_TUNE_EPOCHS)
    parser.add_argument("--weights", default="none", help="imagenet, none, or a path to ResNet50 notop weights")
    return parser.parse_args(argv)


def main(argv=None):
    options = parse_arguments(sys.argv[1:] if argv is None else argv)
    train = pd.read_csv(options.data_dir / "train.csv")
    test = pd.read_csv(options.data_dir / "test.csv")
    images = load_images([str(options.data_dir / path) for path in train["image_path"]], options.image_size)
    labels = train[list(script.CLASS_NAMES)].to_numpy(np.float32)
    train_images, validation_images, train_labels, validation_labels = train_test_split(
        images, labels, test_size=script.VAL_FRACTION, random_state=script.SEED
    )
    batches = augmenter().flow(train_images, train_labels, batch_size=options.batch_size)

    model = script.build_model(options.image_size, script.resolve_weights(options.weights)[0], from_scratch=False)
    script.compile_model(model, script.LEARNING_RATE)
    model.fit(batches, validation_data=(validation_images, validation_labels), epochs=options.epochs, verbose=2)
    if options.fine_tune_epochs > 0:
        script.unfreeze_model(model, script.FINE_TUNE_LAYERS)
        script.compile_model(model, script.FINE_TUNE_LEARNING_RATE)
        model.fit(
            batches, validation_data=(validation_images, validation_labels), epochs=options.fine_tune_epochs, verbose=2
        )

    test_images = load_images([str(options.data_dir / path) for path in test["image_path"]], options.image_size)
    probabilities = model.predict(test_images, batch_size=options.batch_size, verbose=0)
    submission = pd.DataFrame(probabilities, columns=list(script.CLASS_NAMES))
    submission.insert(0, "row_id", test["row_id"])
    options.output_dir.mkdir(parents=True, exist_ok=True)
    submission.to_csv(options.output_dir / "submission.csv", index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
