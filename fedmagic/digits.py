"""Real handwritten digits, written to disk as MNIST, for machines that cannot download it.

scikit-learn ships 1797 real 8x8 digits; this module upscales them to MNIST's 28x28 and writes
them in MNIST's own IDX files, one directory per party, so ``torchvision.datasets.MNIST(root)``
reads them unchanged and ``download=True`` finds everything in place and fetches nothing.
"""

from __future__ import annotations

import gzip
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigurationError
from .partition import SCHEMES, split_indices

__all__ = ["SPLITS", "Layout", "Party", "mnist_like_digits", "write_mnist", "write_partitions"]

SPLITS = SCHEMES
_IMAGES_MAGIC, _LABELS_MAGIC = 0x00000803, 0x00000801


@dataclass(frozen=True)
class Party:
    """One party's place on disk: run it in ``workdir``; pass ``data_dir`` to MNIST as root."""

    name: str
    workdir: Path
    data_dir: Path
    train_size: int


@dataclass(frozen=True)
class Layout:
    """What ``write_partitions`` wrote: the initiator, the nodes and the shared test set's size."""

    initiator: Party
    nodes: tuple[Party, ...]
    test_size: int


def mnist_like_digits() -> tuple[np.ndarray, np.ndarray]:
    """Return scikit-learn's digits drawn the way MNIST draws its digits.

    Returns:
        ``(images, labels)``: uint8 ``(1797, 28, 28)`` in 0..255, each digit in the centred
        20x20 box MNIST uses, and uint8 labels 0..9.
    """
    from sklearn.datasets import load_digits  # ships with scikit-learn: nothing to download

    digits = load_digits()
    small = torch.from_numpy(digits.images).float().mul(255.0 / 16.0).unsqueeze(1)
    box = torch.nn.functional.interpolate(
        small, size=(20, 20), mode="bilinear", align_corners=False, antialias=True
    )
    pixels = box.squeeze(1).round().clamp(0, 255).to(torch.uint8).numpy()
    images = np.zeros((len(pixels), 28, 28), dtype=np.uint8)
    images[:, 4:24, 4:24] = pixels
    return images, digits.target.astype(np.uint8)


def _idx_bytes(magic: int, array: np.ndarray) -> bytes:
    header = struct.pack(f">I{array.ndim}I", magic, *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def _checked(name: str, images, labels) -> tuple[np.ndarray, np.ndarray]:
    images, labels = np.asarray(images), np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ConfigurationError(
            name,
            f"{images.dtype} {images.shape}",
            "pass uint8 images shaped (N, 28, 28), as mnist_like_digits() returns",
        )
    in_range = labels.size == 0 or 0 <= labels.min() <= labels.max() <= 255
    if labels.shape != (len(images),) or not in_range:
        raise ConfigurationError(
            name.replace("images", "labels"),
            f"shape {labels.shape}",
            f"pass one label in 0..255 per image ({len(images)} images)",
        )
    return images, labels


def write_mnist(
    root: str | os.PathLike,
    images: np.ndarray,
    labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
) -> Path:
    """Write one party's data as MNIST, so that ``MNIST(root)`` reads it as it reads MNIST.

    The eight files (IDX and their ``.gz`` twins) go to ``root/MNIST/raw`` for torchvision and,
    hard-linked, to ``root`` itself for dataset checks that look there. torchvision cannot read a
    count-0 IDX file, so an empty split is also saved in torchvision's legacy
    ``MNIST/processed`` form, which ``MNIST`` prefers over the raw files.

    Returns:
        ``root``, ready to pass to ``torchvision.datasets.MNIST``.

    Raises:
        ValueError: images are not uint8 (N, 28, 28), or labels do not match them.
    """
    images, labels = _checked("images", images, labels)
    test_images, test_labels = _checked("test_images", test_images, test_labels)
    root = Path(root)
    raw, processed = root / "MNIST" / "raw", root / "MNIST" / "processed"
    raw.mkdir(parents=True, exist_ok=True)
    contents = {
        "train-images-idx3-ubyte": _idx_bytes(_IMAGES_MAGIC, images),
        "train-labels-idx1-ubyte": _idx_bytes(_LABELS_MAGIC, labels),
        "t10k-images-idx3-ubyte": _idx_bytes(_IMAGES_MAGIC, test_images),
        "t10k-labels-idx1-ubyte": _idx_bytes(_LABELS_MAGIC, test_labels),
    }
    for name, data in contents.items():
        for file_name, payload in ((name, data), (name + ".gz", gzip.compress(data, mtime=0))):
            raw_file, root_file = raw / file_name, root / file_name
            raw_file.unlink(missing_ok=True)  # never rewrite an inode another party may share
            raw_file.write_bytes(payload)
            root_file.unlink(missing_ok=True)
            try:
                os.link(raw_file, root_file)
            except OSError:
                shutil.copyfile(raw_file, root_file)
    legacy = {"training.pt": (images, labels), "test.pt": (test_images, test_labels)}
    if len(images) and len(test_images):
        for file_name in legacy:  # stale legacy files would hide the raw ones from MNIST
            (processed / file_name).unlink(missing_ok=True)
    else:
        processed.mkdir(parents=True, exist_ok=True)
        for file_name, (x, y) in legacy.items():
            pair = (
                torch.from_numpy(np.array(x, dtype=np.uint8)),
                torch.from_numpy(np.array(y, dtype=np.int64)),
            )
            torch.save(pair, processed / file_name)
    return root


def _split_test(
    labels: np.ndarray, test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Hold out ``test_fraction`` of every label, at least one each, so every class is tested."""
    held: list[np.intp] = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        take = min(max(1, round(test_fraction * len(members))), len(members) - 1)
        held.extend(members[:take])
    test = np.sort(np.array(held))
    train = rng.permutation(np.setdiff1d(np.arange(len(labels)), test))
    return train, test


def write_partitions(
    workdir: str | os.PathLike,
    participants: int,
    *,
    split: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    test_fraction: float = 0.2,
    data_dir: str = "data",
) -> Layout:
    """Write the digits for an initiator and ``participants`` nodes, the same way for a seed.

    Every party gets the same held-out test set; the initiator gets an empty training set (it
    never trains, but MNIST needs all four files). ``split`` is a scheme of
    :mod:`fedmagic.partition`: ``iid``; ``dirichlet``, each label shared out in
    Dirichlet(``alpha``) proportions; or ``by-label``, McMahan et al.'s non-IID scheme:
    training images sorted by label, cut into ``2 * participants`` shards, two each.

    Args:
        workdir: holds one working directory per party: ``initiator``, ``node-1`` ...
        data_dir: relative path inside each party's directory, e.g. ``"demo_task/data"``.

    Raises:
        ValueError: a parameter that cannot work; the message names it and what to do.
    """
    if isinstance(participants, bool) or not isinstance(participants, int) or participants < 1:
        raise ConfigurationError(
            "participants", participants, "pass a whole number of nodes, at least 1"
        )
    if split not in SPLITS:
        raise ConfigurationError("split", split, f"choose one of {', '.join(map(repr, SPLITS))}")
    if not 0 < test_fraction < 1:
        raise ConfigurationError(
            "test_fraction", test_fraction, "pass a fraction strictly between 0 and 1, e.g. 0.2"
        )
    if Path(data_dir).is_absolute() or ".." in Path(data_dir).parts:
        raise ConfigurationError(
            "data_dir", data_dir, "pass a path relative to each party's directory, e.g. 'data'"
        )
    images, labels = mnist_like_digits()
    rng = np.random.default_rng(seed)
    train, test = _split_test(labels, test_fraction, rng)
    parts = split_indices(train, labels, participants, split, rng, alpha=alpha)

    workdir = Path(workdir)
    test_x, test_y = images[test], labels[test]

    def party(name: str, x: np.ndarray, y: np.ndarray) -> Party:
        home = workdir / name
        return Party(name, home, write_mnist(home / data_dir, x, y, test_x, test_y), len(x))

    initiator = party("initiator", images[:0], labels[:0])
    nodes = tuple(party(f"node-{i}", images[part], labels[part]) for i, part in enumerate(parts, 1))
    return Layout(initiator, nodes, len(test))
