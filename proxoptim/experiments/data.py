"""Datasets for the experiments: scikit-learn's digits and CIFAR-10 with the paper's split.

Every loader returns a :class:`Splits`: float32 images shaped ``(N, C, H, W)`` with pixels
divided by their maximum value (so in ``[0, 1]``, no mean subtraction) and int64 labels
shaped ``(N,)``, for a training, a validation and a test split.

CIFAR-10 (paper §5: 45,000 training / 5,000 validation / 10,000 test images, pixels / 255) is
read from any of these layouts under ``data_dir``:

1. the official python batches ``cifar-10-batches-py/`` (what
   ``torchvision.datasets.CIFAR10(root, download=True)`` fetches);
2. an ImageFolder tree ``train/<class>/*.jpg|png`` and ``test/<class>/*``, possibly one or
   two directory levels below ``data_dir``;
3. a tar archive (``*.tar.gz``, ``*.tgz``, ``*.tar``) holding layout 1 or 2, in ``data_dir``
   or given as ``data_dir`` itself.

Images that need decoding (layouts 2 and 3) are decoded once and cached as one tensor file in
a cache directory; the cache file's name carries a fingerprint of the source, so a changed or
different source is never served from a stale cache. A missing or malformed dataset raises
:class:`DatasetError` with a message that names the place searched and the layouts expected.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import warnings
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, BinaryIO, NamedTuple, TypeVar

import torch
from torch import Tensor

__all__ = [
    "CIFAR10_CLASSES",
    "DATASETS",
    "INPUT_SHAPES",
    "DatasetError",
    "Splits",
    "load_cifar10",
    "load_dataset",
    "load_digits",
]

DATASETS = ("digits", "cifar10")

#: CIFAR-10's classes in label order (alphabetical, which ImageFolder layouts rely on).
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

#: Shape ``(C, H, W)`` of one image of each dataset, known before any data is loaded (the
#: command line builds its models and optimizers with it to check a configuration early).
INPUT_SHAPES: dict[str, tuple[int, int, int]] = {"digits": (1, 8, 8), "cifar10": (3, 32, 32)}

#: Where the official CIFAR-10 files come from (for machines that cannot download them).
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"

_OFFICIAL_DIR = "cifar-10-batches-py"
_OFFICIAL_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_OFFICIAL_TEST = "test_batch"
_OFFICIAL_FILES = (*_OFFICIAL_TRAIN, _OFFICIAL_TEST)
_IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".ppm"})
_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
_SIDE = 32  # CIFAR-10 images are 32x32 RGB
_PIXELS = 3 * _SIDE * _SIDE
_CACHE_VERSION = 1
_INSTALL_HINT = 'pip install -e ".[dev]"'
_T = TypeVar("_T")

# Globals a CIFAR-10 batch pickle may reference (numpy arrays and, from Python 2 pickles
# written with protocol 2 under Python 3, bytes); anything else is refused, not executed.
_PICKLE_GLOBALS = frozenset(
    {
        ("_codecs", "encode"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
    }
)


class DatasetError(ValueError):
    """A dataset is missing or malformed; the message says where and what was expected."""


@dataclass(frozen=True, eq=False)
class Splits:
    """A dataset split into training, validation and test sets.

    Attributes:
        train_x: Training images, float32 ``(N_train, C, H, W)``, values in ``[0, 1]``.
        train_y: Training labels, int64 ``(N_train,)``, values in ``[0, num_classes)``.
        val_x: Validation images, float32 ``(N_val, C, H, W)``.
        val_y: Validation labels, int64 ``(N_val,)``.
        test_x: Test images, float32 ``(N_test, C, H, W)``.
        test_y: Test labels, int64 ``(N_test,)``.
        name: The dataset's name, e.g. ``"cifar10"``.
        num_classes: Number of classes.
    """

    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    test_x: Tensor
    test_y: Tensor
    name: str
    num_classes: int

    def __post_init__(self) -> None:
        shape = self.train_x.shape[1:]
        for split in ("train", "val", "test"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if x.dtype != torch.float32 or x.dim() != 4:
                raise ValueError(
                    f"{split}_x must be float32 (N, C, H, W), got {x.dtype} {tuple(x.shape)}"
                )
            if y.dtype != torch.int64 or y.dim() != 1 or y.shape[0] != x.shape[0]:
                raise ValueError(
                    f"{split}_y must be int64 ({x.shape[0]},), got {y.dtype} {tuple(y.shape)}"
                )
            if x.shape[1:] != shape:
                raise ValueError(
                    f"{split}_x has images {tuple(x.shape[1:])}, train_x {tuple(shape)}"
                )

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """The shape ``(C, H, W)`` of one image."""
        c, h, w = self.train_x.shape[1:]
        return int(c), int(h), int(w)

    def subset(
        self, train: int | None = None, val: int | None = None, test: int | None = None
    ) -> Splits:
        """The first images of each split, e.g. for quick runs.

        Args:
            train: Keep the first ``min(train, N_train)`` training images; None keeps all.
            val: The same for the validation split.
            test: The same for the test split.

        Returns:
            A new :class:`Splits`; tensors of shortened splits are copies, so the full
            dataset's memory can be freed.
        """
        fields: dict[str, Tensor] = {}
        for split, k in (("train", train), ("val", val), ("test", test)):
            if k is None:
                continue
            if k < 0:
                raise ValueError(f"subset size for {split} must be >= 0, got {k}")
            for part in ("x", "y"):
                t: Tensor = getattr(self, f"{split}_{part}")
                fields[f"{split}_{part}"] = t[:k].clone() if k < t.shape[0] else t
        return replace(self, **fields)


# --------------------------------------------------------------------------- digits


def load_digits(seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2) -> Splits:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes).

    The images are shuffled with ``seed`` (the same seed gives the same split) and cut into
    test (``round(1797 * test_fraction)`` images), validation (``round(1797 *
    val_fraction)``) and training (the rest) sets.

    Args:
        seed: Seed of the shuffle.
        val_fraction: Fraction of all images used for validation.
        test_fraction: Fraction of all images used for testing.

    Returns:
        Splits with images float32 ``(N, 1, 8, 8)`` (values 0..16 divided by 16) and labels
        int64 ``(N,)`` in ``0..9``.

    Raises:
        ImportError: scikit-learn is not installed.
        ValueError: The fractions are negative or leave no training images.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            "need 0 <= val_fraction, test_fraction and val_fraction + test_fraction < 1, got "
            f"{val_fraction} and {test_fraction}"
        )
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError as exc:
        raise ImportError(
            f"the digits dataset needs scikit-learn; install the dev extras: {_INSTALL_HINT}"
        ) from exc
    bunch = sklearn_load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32).div_(16.0).unsqueeze(1)
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    n = y.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_test = round(n * test_fraction)
    n_val = round(n * val_fraction)
    n_train = n - n_val - n_test
    if n_train < 1:
        raise ValueError(f"fractions {val_fraction} and {test_fraction} leave no training images")
    a, b = n_train, n_train + n_val
    return Splits(x[:a], y[:a], x[a:b], y[a:b], x[b:], y[b:], name="digits", num_classes=10)


# --------------------------------------------------------------------------- CIFAR-10


class _Raw(NamedTuple):
    """CIFAR-10 as stored: uint8 images ``(N, 3, 32, 32)`` and int64 labels ``(N,)``."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor


def load_cifar10(
    data_dir: str | Path,
    download: bool = False,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> Splits:
    """CIFAR-10 with the paper's split: 45,000 train / 5,000 validation / 10,000 test.

    The 50,000 training images, in the source's order, are cut into the first 45,000 for
    training and the last 5,000 for validation. The order is ``data_batch_1`` ...
    ``data_batch_5`` for the official batches; for ImageFolder trees it is round-robin over
    the classes (the first file of every class in label order, then the second, ...; files
    sorted by name within a class), so the validation images cover all classes evenly. A
    smaller training set (e.g. a test fixture) keeps the ratio: the last 10% (at least one
    image) validate.

    Layouts accepted under ``data_dir`` (see the module docstring): ``cifar-10-batches-py/``;
    ``train/<class>/`` with ``test/<class>/`` up to two levels down; a tar archive holding
    either, in ``data_dir`` or as ``data_dir`` itself. Archives are read in one streaming
    pass, nothing is extracted. Images that need decoding (ImageFolder trees and archives)
    are decoded once and cached as ``cache_dir/cifar10-<fingerprint>.pt``.

    Args:
        data_dir: Where to look: a folder, or the path of a tar archive.
        download: If no dataset is found, fetch the official batches into ``data_dir`` with
            ``torchvision.datasets.CIFAR10``.
        cache_dir: Folder of the decoded-image cache. Default: ``$PROXOPTIM_CACHE/cifar10``
            if the environment variable is set, else ``~/.cache/proxoptim/cifar10``.
        progress: Show a progress bar (if tqdm is installed) while decoding images.

    Returns:
        Splits named ``"cifar10"`` with images float32 ``(N, 3, 32, 32)`` (pixels / 255) and
        labels int64 ``(N,)`` in ``0..9`` (order of :data:`CIFAR10_CLASSES`).

    Raises:
        DatasetError: No dataset was found (and ``download`` is False or failed), or the one
            found is malformed; the message names the place and the layouts expected.
    """
    data_dir = Path(data_dir).expanduser()
    cache = _cache_dir(cache_dir)
    raw, hints = _load_raw(data_dir, cache, progress)
    if raw is None and download:
        _download(data_dir)
        raw, hints = _load_raw(data_dir, cache, progress)
    if raw is None:
        raise DatasetError(_not_found_message(data_dir, hints, download))
    return _to_splits(raw)


def _cache_dir(cache_dir: str | Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("PROXOPTIM_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "proxoptim"
    return root / "cifar10"


def _to_splits(raw: _Raw) -> Splits:
    n = raw.train_x.shape[0]
    if n < 2:
        raise DatasetError(f"only {n} training image(s): need 2 or more to split off validation")
    n_val = max(1, n // 10)  # 5,000 of 50,000, the paper's split
    n_train = n - n_val
    train_x = raw.train_x.to(torch.float32).div_(255.0)
    test_x = raw.test_x.to(torch.float32).div_(255.0)
    return Splits(
        train_x=train_x[:n_train],
        train_y=raw.train_y[:n_train],
        val_x=train_x[n_train:],
        val_y=raw.train_y[n_train:],
        test_x=test_x,
        test_y=raw.test_y,
        name="cifar10",
        num_classes=len(CIFAR10_CLASSES),
    )


def _load_raw(data_dir: Path, cache: Path, progress: bool) -> tuple[_Raw | None, list[str]]:
    """Find a dataset under ``data_dir`` and read it; None (and hints) if there is none."""
    found, hints = _locate(data_dir)
    if found is None:
        return None, hints
    kind, path = found
    if kind == "official":
        return _read_official([path / name for name in _OFFICIAL_FILES]), hints
    if kind == "imagefolder":
        listing = _list_imagefolder(path)
        stats = "\n".join(
            _stat_line(p.relative_to(path), p) for split in listing.values() for p, _ in split
        )
        key = _fingerprint(f"imagefolder\n{path.resolve()}\n{stats}")
        return _cached(cache, key, lambda: _decode_listing(listing, progress)), hints
    key = _fingerprint(f"archive\n{path.resolve()}\n{_stat_line(path.name, path)}")
    return _cached(cache, key, lambda: _read_archive(path, progress)), hints


def _locate(root: Path) -> tuple[tuple[str, Path] | None, list[str]]:
    """The first layout found under ``root`` as (kind, path), and notes on near misses.

    Official batches win over ImageFolder trees (they are the lossless original), which win
    over archives; shallower folders win over deeper ones.
    """
    hints: list[str] = []
    if root.is_file():
        if _is_archive(root):
            return ("archive", root), hints
        hints.append(f"{root} is a file but not a tar archive")
        return None, hints
    if not root.is_dir():
        hints.append(f"{root} does not exist")
        return None, hints
    candidates = _candidate_dirs(root)
    for d in candidates:
        present = [name for name in _OFFICIAL_FILES if (d / name).is_file()]
        if len(present) == len(_OFFICIAL_FILES):
            return ("official", d), hints
        if present:
            missing = [name for name in _OFFICIAL_FILES if name not in present]
            hints.append(f"{d} holds {', '.join(present)} but lacks {', '.join(missing)}")
    for d in candidates:
        has_train, has_test = (d / "train").is_dir(), (d / "test").is_dir()
        if has_train and has_test:
            return ("imagefolder", d), hints
        if has_train != has_test:
            there, absent = ("train", "test") if has_train else ("test", "train")
            hints.append(f"{d / there} exists but {d / absent} is missing")
    archives = sorted(
        (p for p in _children(root) if p.is_file() and p.name.lower().endswith(_ARCHIVE_SUFFIXES)),
        key=lambda p: ("cifar" not in p.name.lower(), p.name),
    )
    if archives:
        return ("archive", archives[0]), hints
    return None, hints


def _children(d: Path) -> list[Path]:
    try:
        return sorted(p for p in d.iterdir() if not p.name.startswith("."))
    except OSError:
        return []


def _candidate_dirs(root: Path) -> list[Path]:
    """``root`` and its sub-folders one and two levels down, breadth first."""
    level = [root]
    out = [root]
    for _ in range(2):
        level = [c for d in level for c in _children(d) if c.is_dir()]
        out.extend(level)
    return out


def _is_archive(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False


def _not_found_message(data_dir: Path, hints: list[str], download: bool) -> str:
    d = data_dir
    lines = [
        f"No CIFAR-10 dataset found in {d}" + (" (even after download=True)." if download else "."),
        "Expected one of these layouts:",
        f"  1. official python batches: {d / _OFFICIAL_DIR}/"
        f"{{{', '.join(_OFFICIAL_TRAIN)}, {_OFFICIAL_TEST}}}",
        f"  2. ImageFolder images: {d / 'train'}/<class>/*.jpg|*.png and "
        f"{d / 'test'}/<class>/*.jpg|*.png, classes {', '.join(CIFAR10_CLASSES)}; the folder "
        f"holding train/ and test/ may also sit one or two levels below {d}",
        f"  3. a tar archive holding layout 1 or 2: {d}/*.tar.gz (or *.tgz, *.tar), or "
        "data_dir itself the path of the archive",
    ]
    if hints:
        lines.append("Found instead:")
        lines.extend(f"  - {hint}" for hint in hints)
    lines.append("What you can do:")
    if not download:
        lines.append(
            "  - pass --download (download=True) to fetch the official batches (about 170 MB) "
            f"into {d} with torchvision;"
        )
    lines += [
        "  - point --data-dir (data_dir) at a copy you already have: torchvision's "
        "cifar-10-batches-py/ folder, an ImageFolder tree (train/<class>/..., "
        "test/<class>/...), or a .tar.gz of either (such as cifar-10-python.tar.gz from "
        f"{CIFAR10_URL}).",
    ]
    return "\n".join(lines)


def _download(data_dir: Path) -> None:
    try:
        from torchvision.datasets import CIFAR10
    except ImportError as exc:
        raise ImportError(
            f"download=True needs torchvision; install the dev extras: {_INSTALL_HINT}"
        ) from exc
    try:
        for train in (True, False):
            CIFAR10(root=str(data_dir), train=train, download=True)
    except Exception as exc:
        raise DatasetError(
            f"downloading CIFAR-10 into {data_dir} failed ({type(exc).__name__}: {exc}); "
            "without internet access, copy cifar-10-python.tar.gz (from "
            f"{CIFAR10_URL}) or a cifar-10-batches-py/ folder, an ImageFolder tree "
            "(train/<class>/..., test/<class>/...) or a .tar.gz of either to this machine and "
            "point --data-dir (data_dir) at it"
        ) from exc


# ---- official python batches


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and plain containers only; refuses any other global."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        if module.startswith("numpy.core."):
            import numpy

            if int(numpy.__version__.split(".")[0]) >= 2:  # numpy.core was renamed numpy._core
                module = "numpy._core." + module.removeprefix("numpy.core.")
        return super().find_class(module, name)


@dataclass(frozen=True)
class _Member:
    """A file read from a tar archive: its path inside the archive and its bytes."""

    archive: Path
    path: PurePosixPath
    data: bytes = field(repr=False)

    @property
    def name(self) -> str:
        return self.path.name

    def __str__(self) -> str:
        return f"{self.archive}:{self.path}"


def _open(source: Path | _Member) -> BinaryIO:
    return io.BytesIO(source.data) if isinstance(source, _Member) else open(source, "rb")


def _read_official(sources: Sequence[Path | _Member]) -> _Raw:
    """The batches ``data_batch_1`` ... ``data_batch_5`` and ``test_batch``, in that order."""
    train = [_read_batch(src) for src in sources[:5]]
    test_x, test_y = _read_batch(sources[5])
    return _Raw(torch.cat([x for x, _ in train]), torch.cat([y for _, y in train]), test_x, test_y)


def _read_batch(source: Path | _Member) -> tuple[Tensor, Tensor]:
    """One pickled batch: images uint8 ``(N, 3, 32, 32)`` and labels int64 ``(N,)``."""
    try:
        with _open(source) as f:
            batch = _BatchUnpickler(f, encoding="bytes").load()
    except Exception as exc:
        raise DatasetError(
            f"{source}: not a readable CIFAR-10 batch ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(batch, dict):
        raise DatasetError(f"{source}: expected a pickled dict, got {type(batch).__name__}")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise DatasetError(f"{source}: the batch dict lacks the keys b'data' and b'labels'")
    import numpy

    if (
        not isinstance(data, numpy.ndarray)
        or data.dtype != numpy.uint8
        or data.ndim != 2
        or data.shape[1] != _PIXELS
        or data.shape[0] == 0
    ):
        got = f"{data.dtype} {data.shape}" if isinstance(data, numpy.ndarray) else type(data)
        raise DatasetError(f"{source}: b'data' must be a uint8 array (N, {_PIXELS}), got {got}")
    try:
        y = torch.as_tensor(numpy.asarray(labels, dtype=numpy.int64))
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"{source}: b'labels' is not a list of integers ({exc})") from exc
    if y.shape != (data.shape[0],):
        raise DatasetError(
            f"{source}: {data.shape[0]} images but b'labels' has shape {tuple(y.shape)}"
        )
    _check_labels(y, source)
    # Each row holds the red, then the green, then the blue 32x32 plane, row-major.
    x = torch.from_numpy(numpy.ascontiguousarray(data)).reshape(-1, 3, _SIDE, _SIDE)
    return x, y


def _check_labels(y: Tensor, where: object) -> None:
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= len(CIFAR10_CLASSES)):
        raise DatasetError(
            f"{where}: labels must lie in 0..9, found {int(y.min())}..{int(y.max())}"
        )


# ---- ImageFolder trees


def _list_imagefolder(root: Path) -> dict[str, list[tuple[Path, int]]]:
    """The image files of ``root/train`` and ``root/test`` as (path, label), ordered."""
    listing = {}
    for split in ("train", "test"):
        split_dir = root / split
        listing[split] = _imagefolder_split(
            split_dir,
            (p.name for p in _children(split_dir) if p.is_dir()),
            lambda c, d=split_dir: [
                p for p in _children(d / c) if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file()
            ],
        )
    return listing


_S = TypeVar("_S", Path, _Member)


def _imagefolder_split(
    split_dir: object, folders: Iterable[str], files: Callable[[str], list[_S]]
) -> list[tuple[_S, int]]:
    """One split of an ImageFolder tree as (image source, label), ordered.

    Args:
        split_dir: The split's folder, for messages.
        folders: Names of the sub-folders of ``split_dir``.
        files: The image files of one class folder, given its name.

    Returns:
        The images round-robin over the classes: the first file (by name) of every class in
        label order, then the second, and so on.
    """
    present = {name for name in folders if not name.startswith(".")}
    missing = [c for c in CIFAR10_CLASSES if c not in present]
    unexpected = sorted(present.difference(CIFAR10_CLASSES))
    if missing or unexpected:
        raise DatasetError(
            f"{split_dir}: expected one folder per class ({', '.join(CIFAR10_CLASSES)}); "
            + (f"missing: {', '.join(missing)}" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"unexpected: {', '.join(unexpected)}" if unexpected else "")
        )
    per_class = [sorted(files(c), key=lambda f: f.name) for c in CIFAR10_CLASSES]
    if not any(per_class):
        suffixes = ", *".join(sorted(_IMAGE_SUFFIXES))
        raise DatasetError(f"{split_dir}: no images (*{suffixes}) in its class folders")
    longest = max(len(f) for f in per_class)
    return [
        (f[k], label) for k in range(longest) for label, f in enumerate(per_class) if k < len(f)
    ]


def _decode_listing(listing: dict[str, list[tuple[_S, int]]], progress: bool) -> _Raw:
    out: list[Tensor] = []
    for split in ("train", "test"):
        items = listing[split]
        out.append(_decode_images([p for p, _ in items], progress, f"decoding CIFAR-10 {split}"))
        out.append(torch.tensor([label for _, label in items], dtype=torch.int64))
    return _Raw(*out)


def _decode_images(sources: Sequence[Path | _Member], progress: bool, desc: str) -> Tensor:
    """Decode 32x32 images into one uint8 tensor ``(N, 3, 32, 32)``.

    A plain loop: a 32x32 JPEG decodes in about 0.1 ms, so 60,000 take about 6 s, and worker
    processes would save little of that once (measured: ~1.5x on two cores).
    """
    try:
        from PIL import Image
    except ImportError as exc:
        raise ImportError(
            f"decoding images needs Pillow; install the dev extras: {_INSTALL_HINT}"
        ) from exc
    buf = bytearray(len(sources) * _PIXELS)
    for i, src in enumerate(_progress(sources, progress, desc)):
        try:
            with Image.open(io.BytesIO(src.data) if isinstance(src, _Member) else src) as im:
                size = im.size
                pixels = im.convert("RGB").tobytes() if size == (_SIDE, _SIDE) else b""
        except Exception as exc:
            raise DatasetError(f"{src}: cannot decode image ({type(exc).__name__}: {exc})") from exc
        if size != (_SIDE, _SIDE):
            raise DatasetError(f"{src}: image is {size[0]}x{size[1]}, CIFAR-10's are 32x32")
        buf[i * _PIXELS : (i + 1) * _PIXELS] = pixels
    hwc = torch.frombuffer(buf, dtype=torch.uint8).reshape(-1, _SIDE, _SIDE, 3)
    return hwc.permute(0, 3, 1, 2).contiguous()


def _progress(items: Sequence[_T], enabled: bool, desc: str) -> Iterable[_T]:
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, unit="img", leave=False)


# ---- archives


def _read_archive(archive: Path, progress: bool) -> _Raw:
    """Read the layout inside ``archive`` straight from the archive (no extraction).

    Layouts are looked for as in a folder: official batches directly in a folder at most two
    levels down, else a folder at most two levels down holding ``train/`` and ``test/``.
    """
    files = _scan_archive(archive)
    folders = {parent for path in files for parent in path.parents}
    hints: list[str] = []
    batch_dirs = {p.parent for p in files if p.name in _OFFICIAL_FILES and len(p.parts) <= 3}
    for d in sorted(batch_dirs, key=_depth_first):
        present = [name for name in _OFFICIAL_FILES if d / name in files]
        if len(present) == len(_OFFICIAL_FILES):
            return _read_official([files[d / name] for name in _OFFICIAL_FILES])
        missing = [name for name in _OFFICIAL_FILES if name not in present]
        hints.append(f"{archive}:{d} holds {', '.join(present)} but lacks {', '.join(missing)}")
    by_folder: dict[PurePosixPath, list[_Member]] = {}
    for path, member in files.items():
        if path.suffix.lower() in _IMAGE_SUFFIXES:
            by_folder.setdefault(path.parent, []).append(member)
    subfolders: dict[PurePosixPath, list[str]] = {}
    for f in folders:
        if f.parts:
            subfolders.setdefault(f.parent, []).append(f.name)
    for d in sorted((f for f in folders if len(f.parts) <= 2), key=_depth_first):
        has_train, has_test = d / "train" in folders, d / "test" in folders
        if has_train and has_test:
            listing = {
                split: _imagefolder_split(
                    f"{archive}:{d / split}",
                    subfolders.get(d / split, []),
                    lambda c, sd=d / split: by_folder.get(sd / c, []),
                )
                for split in ("train", "test")
            }
            return _decode_listing(listing, progress)
        if has_train != has_test:
            there, absent = ("train", "test") if has_train else ("test", "train")
            hints.append(f"{archive}:{d / there} exists but {d / absent} is missing")
    raise DatasetError(
        f"{archive}: the archive holds neither {_OFFICIAL_DIR}/ (data_batch_1..5, test_batch) "
        "nor train/<class>/ and test/<class>/ image folders, at most two levels down"
        + "".join(f"; {hint}" for hint in hints)
    )


def _depth_first(path: PurePosixPath) -> tuple[int, str]:
    return len(path.parts), str(path)


def _scan_archive(archive: Path) -> dict[PurePosixPath, _Member]:
    """The files of ``archive`` that a layout can use (shallow enough, named like a batch or
    an image), read into memory in one pass, keyed by their path inside the archive.

    Raises:
        DatasetError: The archive is unreadable, or a member has an absolute path or a
            ``..`` component (nothing is extracted, but such an archive is not trusted).
    """
    files: dict[PurePosixPath, _Member] = {}
    try:
        with tarfile.open(archive, "r:*") as tf:
            for m in tf:
                name = m.name.replace("\\", "/")
                path = PurePosixPath(name)
                if name.startswith("/") or PureWindowsPath(m.name).drive or ".." in path.parts:
                    raise DatasetError(
                        f"{archive}: refusing member {m.name!r} (absolute path or '..' component)"
                    )
                usable = path.name in _OFFICIAL_FILES or path.suffix.lower() in _IMAGE_SUFFIXES
                if not (m.isfile() and usable and len(path.parts) <= 5):
                    continue
                if any(part.startswith(".") for part in path.parts):
                    continue
                f = tf.extractfile(m)
                if f is not None:
                    files[path] = _Member(archive, path, f.read())
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise DatasetError(
            f"{archive}: cannot read the archive ({type(exc).__name__}: {exc})"
        ) from exc
    return files


# ---- cache


def _stat_line(name: object, path: Path) -> str:
    st = path.stat()
    return f"{name}\t{st.st_size}\t{st.st_mtime_ns}"


def _fingerprint(description: str) -> str:
    text = f"proxoptim cifar10 cache v{_CACHE_VERSION}\n{description}"
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _cached(cache: Path, key: str, build: Callable[[], _Raw]) -> _Raw:
    """The cached ``_Raw`` for ``key``, or ``build()``'s, then saved under ``key``."""
    file = cache / f"cifar10-{key}.pt"
    if file.is_file():
        raw = _load_cache(file)
        if raw is not None:
            return raw
    raw = build()
    _save_cache(file, raw)
    return raw


def _load_cache(file: Path) -> _Raw | None:
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
        if obj.get("version") != _CACHE_VERSION:
            raise ValueError(f"cache format {obj.get('version')}, expected {_CACHE_VERSION}")
        raw = _Raw(obj["train_x"], obj["train_y"], obj["test_x"], obj["test_y"])
        for x, y in ((raw.train_x, raw.train_y), (raw.test_x, raw.test_y)):
            if x.dtype != torch.uint8 or x.shape[1:] != (3, _SIDE, _SIDE) or x.shape[0] == 0:
                raise ValueError(f"bad images {x.dtype} {tuple(x.shape)}")
            if y.dtype != torch.int64 or y.shape != (x.shape[0],):
                raise ValueError(f"bad labels {y.dtype} {tuple(y.shape)}")
            _check_labels(y, file)
    except Exception as exc:
        warnings.warn(f"ignoring the unreadable cache {file} ({exc}); rebuilding it", stacklevel=5)
        return None
    return raw


def _save_cache(file: Path, raw: _Raw) -> None:
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"version": _CACHE_VERSION, **raw._asdict()}, tmp)
        os.replace(tmp, file)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        warnings.warn(
            f"could not write the CIFAR-10 cache {file} ({exc}); the next load decodes again; "
            "pass cache_dir or set PROXOPTIM_CACHE to a writable folder",
            stacklevel=5,
        )


# --------------------------------------------------------------------------- dispatch


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    download: bool = False,
    seed: int = 0,
    *,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> Splits:
    """Load a dataset by name.

    Args:
        name: ``"digits"`` (:func:`load_digits`) or ``"cifar10"`` (:func:`load_cifar10`).
        data_dir: CIFAR-10's folder or archive; default ``./data``. Unused for digits.
        download: CIFAR-10 only: fetch the official files if none are found.
        seed: Digits only: seed of the split (CIFAR-10's split is fixed by the paper).
        cache_dir: CIFAR-10 only: see :func:`load_cifar10`.
        progress: CIFAR-10 only: progress bar while decoding images.

    Returns:
        The dataset's :class:`Splits`.

    Raises:
        ValueError: ``name`` is not one of :data:`DATASETS`.
        DatasetError: See :func:`load_cifar10`.
    """
    key = name.lower().replace("-", "")
    if key == "digits":
        return load_digits(seed=seed)
    if key == "cifar10":
        return load_cifar10(
            "data" if data_dir is None else data_dir,
            download=download,
            cache_dir=cache_dir,
            progress=progress,
        )
    raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
