"""Tiny CIFAR-10 look-alikes written into a temporary folder, for tests that need a dataset
without a download or a copy outside the repository.

Shared by tests/experiments/test_data.py (which imports it as ``cifar_fixtures``) and
tests/test_examples.py (which loads it by path). Everything is generated from a seed: the
same call writes the same images.
"""

from __future__ import annotations

import pickle
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from proxoptim.experiments.data import CIFAR10_CLASSES

__all__ = ["images", "make_tar", "write_imagefolder", "write_official"]


def images(rng: np.random.Generator, n: int) -> np.ndarray:
    """n random images, uint8 (n, 32, 32, 3) (height, width, RGB as image files hold them)."""
    return rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def write_official(
    root: Path, per_batch: int = 20, n_test: int = 20, seed: int = 0
) -> dict[str, np.ndarray]:
    """A tiny ``root/cifar-10-batches-py`` in the real format.

    Returns:
        ``train_x``, ``train_y``, ``test_x``, ``test_y``: the images (uint8 ``(n, 32, 32, 3)``)
        and labels in the order the batches hold them.
    """
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    out: dict[str, list[np.ndarray]] = {"train_x": [], "train_y": [], "test_x": [], "test_y": []}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else per_batch
        hwc = images(rng, n)
        labels = rng.integers(0, 10, size=n)
        batch = {
            b"batch_label": name.encode(),
            # Official rows: the red, green and blue 32x32 planes, each row-major.
            b"data": hwc.transpose(0, 3, 1, 2).reshape(n, 3072),
            b"labels": [int(v) for v in labels],
            b"filenames": [f"{name}_{i}.png".encode() for i in range(n)],
        }
        # Protocol 2 (as in the Python 2 originals) for some files, the default for others.
        protocol = 2 if name in ("data_batch_1", "test_batch") else pickle.DEFAULT_PROTOCOL
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
        split = "test" if name == "test_batch" else "train"
        out[f"{split}_x"].append(hwc)
        out[f"{split}_y"].append(labels)
    return {k: np.concatenate(v) for k, v in out.items()}


def write_imagefolder(
    root: Path, n_train: int = 3, n_test: int = 2, seed: int = 0, suffix: str = ".png"
) -> dict[str, list[tuple[np.ndarray, int]]]:
    """Images ``root/{train,test}/<class>/NNNN<suffix>`` for the 10 CIFAR-10 classes.

    Args:
        root: The folder to hold ``train/`` and ``test/`` (created).
        n_train: Training images per class.
        n_test: Test images per class.
        seed: Seed of the random pixels.
        suffix: ``".png"`` (lossless: a loader must return exactly the returned pixels) or
            ``".jpg"`` (as the JPEG copies of CIFAR-10 are; lossy).

    Returns:
        (image, label) per split in the loader's order: round-robin over the classes, files
        by name within a class.
    """
    rng = np.random.default_rng(seed)
    expected: dict[str, list[tuple[np.ndarray, int]]] = {}
    for split, per_class in (("train", n_train), ("test", n_test)):
        by_class = []
        for label, cls in enumerate(CIFAR10_CLASSES):
            folder = root / split / cls
            folder.mkdir(parents=True)
            imgs = images(rng, per_class)
            for i, img in enumerate(imgs):
                Image.fromarray(img).save(folder / f"{i:04d}{suffix}")
            by_class.append([(img, label) for img in imgs])
        expected[split] = [by_class[c][k] for k in range(per_class) for c in range(10)]
    return expected


def make_tar(archive: Path, source: Path, arcname: str) -> Path:
    """``source`` packed as ``arcname`` into the gzipped tar ``archive``; returns ``archive``."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(source, arcname=arcname)
    return archive
