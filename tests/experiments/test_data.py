"""Tests of proxoptim.experiments.data on small fixture datasets built in tmp_path."""

from __future__ import annotations

import io
import pickle
import sys
import tarfile
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from cifar_fixtures import make_tar, write_imagefolder, write_official
from PIL import Image

from proxoptim.experiments import data
from proxoptim.experiments.data import (
    CIFAR10_CLASSES,
    DatasetError,
    Splits,
    load_cifar10,
    load_dataset,
    load_digits,
)

# ---------------------------------------------------------------- fixture builders


def _chw(hwc: np.ndarray) -> torch.Tensor:
    """Images uint8 (n, 32, 32, 3) as the float tensor (n, 3, 32, 32) a loader should give."""
    return torch.from_numpy(hwc).permute(0, 3, 1, 2).to(torch.float32) / 255.0


def _check_imagefolder(splits: Splits, expected: dict[str, list[tuple[np.ndarray, int]]]) -> None:
    train = expected["train"]
    n_val = max(1, len(train) // 10)
    x_all = _chw(np.stack([img for img, _ in train]))
    y_all = torch.tensor([label for _, label in train])
    assert torch.equal(splits.train_x, x_all[:-n_val])
    assert torch.equal(splits.train_y, y_all[:-n_val])
    assert torch.equal(splits.val_x, x_all[-n_val:])
    assert torch.equal(splits.val_y, y_all[-n_val:])
    assert torch.equal(splits.test_x, _chw(np.stack([img for img, _ in expected["test"]])))
    assert torch.equal(splits.test_y, torch.tensor([label for _, label in expected["test"]]))


def _fail(*args: object, **kwargs: object) -> None:
    raise AssertionError("unexpected call: the cache should have served this load")


# ---------------------------------------------------------------- digits


def test_digits_shapes_dtypes_values() -> None:
    s = load_digits(seed=0)
    assert s.name == "digits" and s.num_classes == 10
    assert s.input_shape == (1, 8, 8)
    sizes = (len(s.train_y), len(s.val_y), len(s.test_y))
    assert sizes == (1797 - 180 - 359, 180, 359)
    for x, y in ((s.train_x, s.train_y), (s.val_x, s.val_y), (s.test_x, s.test_y)):
        assert x.dtype == torch.float32 and x.shape == (len(y), 1, 8, 8)
        assert y.dtype == torch.int64
        assert x.min() >= 0.0 and x.max() <= 1.0
        assert y.min() >= 0 and y.max() <= 9
    all_x = torch.cat([s.train_x, s.val_x, s.test_x])
    assert all_x.max() == 1.0  # 16 / 16: no mean subtraction, divided by the maximum
    assert set(torch.cat([s.train_y, s.val_y, s.test_y]).tolist()) == set(range(10))


def test_digits_seeded_split() -> None:
    a, b, c = load_digits(seed=0), load_digits(seed=0), load_digits(seed=1)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.train_x, c.train_x)
    # Same images overall, only split differently.
    total = sorted(torch.cat([a.train_y, a.val_y, a.test_y]).tolist())
    assert total == sorted(torch.cat([c.train_y, c.val_y, c.test_y]).tolist())


def test_digits_fractions() -> None:
    s = load_digits(val_fraction=0.0, test_fraction=0.5)
    assert (len(s.train_y), len(s.val_y), len(s.test_y)) == (899, 0, 898)  # round(898.5)
    assert s.val_x.shape == (0, 1, 8, 8)
    with pytest.raises(ValueError, match="fraction"):
        load_digits(val_fraction=0.5, test_fraction=0.5)


def test_subset() -> None:
    s = load_digits()
    t = s.subset(train=100, test=10)
    assert (len(t.train_y), len(t.val_y), len(t.test_y)) == (100, len(s.val_y), 10)
    assert torch.equal(t.train_x, s.train_x[:100]) and torch.equal(t.test_y, s.test_y[:10])
    assert t.val_x is s.val_x and t.name == s.name and t.input_shape == s.input_shape
    assert len(s.subset(train=10**6).train_y) == len(s.train_y)
    with pytest.raises(ValueError):
        s.subset(val=-1)


def test_splits_validates_its_tensors() -> None:
    x, y = torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="train_y"):
        Splits(x, y[:3], x, y, x, y, name="bad", num_classes=10)
    with pytest.raises(ValueError, match="val_x"):
        Splits(x, y, x.double(), y, x, y, name="bad", num_classes=10)


# ---------------------------------------------------------------- CIFAR-10: official batches


def test_cifar10_official_layout(tmp_path: Path) -> None:
    exp = write_official(tmp_path)
    s = load_cifar10(tmp_path, cache_dir=tmp_path / "cache", progress=False)
    assert s.name == "cifar10" and s.num_classes == 10 and s.input_shape == (3, 32, 32)
    # 100 training images in batch order: the first 90 train, the last 10 validate.
    x, y = _chw(exp["train_x"]), torch.from_numpy(exp["train_y"])
    assert torch.equal(s.train_x, x[:90]) and torch.equal(s.train_y, y[:90])
    assert torch.equal(s.val_x, x[90:]) and torch.equal(s.val_y, y[90:])
    assert torch.equal(s.test_x, _chw(exp["test_x"]))
    assert torch.equal(s.test_y, torch.from_numpy(exp["test_y"]))
    assert s.train_x.dtype == torch.float32 and s.train_y.dtype == torch.int64
    assert not (tmp_path / "cache").exists()  # nothing to decode, nothing cached
    # The batches folder itself may be given too.
    s2 = load_cifar10(tmp_path / "cifar-10-batches-py", cache_dir=tmp_path / "cache")
    assert torch.equal(s2.test_x, s.test_x)


def test_cifar10_official_preferred_over_imagefolder(tmp_path: Path) -> None:
    exp = write_official(tmp_path)
    write_imagefolder(tmp_path)
    s = load_cifar10(tmp_path, cache_dir=tmp_path / "cache", progress=False)
    assert torch.equal(s.test_y, torch.from_numpy(exp["test_y"]))


def test_cifar10_corrupt_pickle_names_file(tmp_path: Path) -> None:
    write_official(tmp_path)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(b"this is not a pickle")
    with pytest.raises(DatasetError, match="data_batch_3") as info:
        load_cifar10(tmp_path, cache_dir=tmp_path / "cache")
    assert str(bad) in str(info.value)


def test_cifar10_wrong_array_size_names_file(tmp_path: Path) -> None:
    write_official(tmp_path)
    bad = tmp_path / "cifar-10-batches-py" / "test_batch"
    batch = {b"data": np.zeros((5, 1000), dtype=np.uint8), b"labels": [0] * 5}
    bad.write_bytes(pickle.dumps(batch))
    with pytest.raises(DatasetError, match=r"test_batch.*\(N, 3072\)"):
        load_cifar10(tmp_path, cache_dir=tmp_path / "cache")


def test_cifar10_pickle_with_foreign_globals_is_refused(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("code ran while unpickling",))

    write_official(tmp_path)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    bad.write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(DatasetError, match=r"data_batch_2.*refusing to load global builtins.print"):
        load_cifar10(tmp_path, cache_dir=tmp_path / "cache")


def test_cifar10_incomplete_official_layout(tmp_path: Path) -> None:
    write_official(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(DatasetError, match="lacks data_batch_4"):
        load_cifar10(tmp_path, cache_dir=tmp_path / "cache")


# ---------------------------------------------------------------- CIFAR-10: ImageFolder


def test_cifar10_imagefolder(tmp_path: Path) -> None:
    exp = write_imagefolder(tmp_path / "src")
    s = load_cifar10(tmp_path / "src", cache_dir=tmp_path / "cache", progress=False)
    _check_imagefolder(s, exp)
    # 30 training images: 27 train, 3 validate; labels round-robin over the classes.
    assert s.train_y.tolist() == list(range(10)) * 2 + list(range(7))
    assert s.val_y.tolist() == [7, 8, 9]
    assert s.test_y.tolist() == list(range(10)) * 2


def test_cifar10_imagefolder_nested_and_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exp = write_imagefolder(tmp_path / "src" / "cifar10")  # one level down
    cache = tmp_path / "cache"
    _check_imagefolder(load_cifar10(tmp_path / "src", cache_dir=cache, progress=False), exp)
    assert len(list(cache.glob("cifar10-*.pt"))) == 1
    monkeypatch.setattr(data, "_decode_images", _fail)
    _check_imagefolder(load_cifar10(tmp_path / "src", cache_dir=cache, progress=False), exp)
    # A changed file changes the fingerprint: the cache is not reused.
    img = tmp_path / "src" / "cifar10" / "train" / "cat" / "0001.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(img)
    with pytest.raises(AssertionError, match="unexpected call"):
        load_cifar10(tmp_path / "src", cache_dir=cache, progress=False)


def test_cifar10_imagefolder_missing_test_folder(tmp_path: Path) -> None:
    write_imagefolder(tmp_path)
    for f in (tmp_path / "test").rglob("*.png"):
        f.unlink()
    for d in sorted((tmp_path / "test").iterdir()):
        d.rmdir()
    (tmp_path / "test").rmdir()
    with pytest.raises(DatasetError, match="test is missing") as info:
        load_cifar10(tmp_path, cache_dir=tmp_path / "cache")
    assert "cifar-10-batches-py" in str(info.value)


def test_cifar10_imagefolder_missing_class_folder(tmp_path: Path) -> None:
    write_imagefolder(tmp_path)
    for f in (tmp_path / "train" / "horse").iterdir():
        f.unlink()
    (tmp_path / "train" / "horse").rmdir()
    with pytest.raises(DatasetError, match="missing: horse") as info:
        load_cifar10(tmp_path, cache_dir=tmp_path / "cache")
    assert str(tmp_path / "train") in str(info.value)


def test_cifar10_imagefolder_without_images(tmp_path: Path) -> None:
    for split in ("train", "test"):
        for cls in CIFAR10_CLASSES:
            (tmp_path / split / cls).mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images"):
        load_cifar10(tmp_path, cache_dir=tmp_path / "cache")


def test_cifar10_imagefolder_corrupt_image_names_file(tmp_path: Path) -> None:
    write_imagefolder(tmp_path)
    bad = tmp_path / "test" / "ship" / "0001.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="cannot decode image") as info:
        load_cifar10(tmp_path, cache_dir=tmp_path / "cache", progress=False)
    assert str(bad) in str(info.value)


def test_cifar10_imagefolder_wrong_image_size(tmp_path: Path) -> None:
    write_imagefolder(tmp_path)
    bad = tmp_path / "train" / "dog" / "0000.png"
    Image.new("RGB", (16, 16)).save(bad)
    with pytest.raises(DatasetError, match="16x16"):
        load_cifar10(tmp_path, cache_dir=tmp_path / "cache", progress=False)


# ---------------------------------------------------------------- CIFAR-10: archives


def test_cifar10_archive_path_and_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exp = write_imagefolder(tmp_path / "src")
    archive = make_tar(tmp_path / "store" / "cifar10-png.tar.gz", tmp_path / "src", ".")
    cache = tmp_path / "cache"
    s = load_cifar10(archive, cache_dir=cache, progress=False)
    _check_imagefolder(s, exp)
    assert len(list(cache.glob("cifar10-*.pt"))) == 1
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []  # no leftovers
    # Second load, from the folder holding the archive: served by the cache.
    monkeypatch.setattr(data, "_decode_images", _fail)
    monkeypatch.setattr(data, "_scan_archive", _fail)
    _check_imagefolder(load_cifar10(tmp_path / "store", cache_dir=cache, progress=False), exp)
    # A different archive does not reuse that cache.
    exp_b = write_imagefolder(tmp_path / "src_b", n_train=2, n_test=1, seed=7)
    archive_b = make_tar(tmp_path / "other" / "b.tar.gz", tmp_path / "src_b", "cifar10")
    with pytest.raises(AssertionError, match="unexpected"):
        load_cifar10(archive_b, cache_dir=cache, progress=False)
    monkeypatch.undo()
    _check_imagefolder(load_cifar10(archive_b, cache_dir=cache, progress=False), exp_b)
    assert len(list(cache.glob("cifar10-*.pt"))) == 2


def test_cifar10_archive_of_official_batches(tmp_path: Path) -> None:
    exp = write_official(tmp_path / "src", per_batch=4)
    archive = make_tar(tmp_path / "cifar-10-python.tar.gz", tmp_path / "src", ".")
    s = load_cifar10(archive, cache_dir=tmp_path / "cache")
    x = _chw(exp["train_x"])
    assert torch.equal(s.train_x, x[:18]) and torch.equal(s.val_x, x[18:])
    assert torch.equal(s.test_y, torch.from_numpy(exp["test_y"]))


def test_cifar10_cache_env_var_and_corrupt_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exp = write_imagefolder(tmp_path / "src", n_train=1, n_test=1)
    archive = make_tar(tmp_path / "a.tar.gz", tmp_path / "src", ".")
    monkeypatch.setenv("PROXOPTIM_CACHE", str(tmp_path / "env_cache"))
    load_cifar10(archive, progress=False)
    (cache_file,) = (tmp_path / "env_cache" / "cifar10").glob("cifar10-*.pt")
    cache_file.write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="unreadable cache"):
        s = load_cifar10(archive, progress=False)
    _check_imagefolder(s, exp)
    assert cache_file.stat().st_size > 1000  # rebuilt


def test_cifar10_unsafe_archive_member(tmp_path: Path) -> None:
    archive = tmp_path / "evil.tar.gz"
    payload = b"x"
    with tarfile.open(archive, "w:gz") as tf:
        info = tarfile.TarInfo("train/../../escaped.txt")
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))
    with pytest.raises(DatasetError, match=r"refusing member.*\.\."):
        load_cifar10(archive, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "escaped.txt").exists()


def test_cifar10_archive_corrupt_image_names_member(tmp_path: Path) -> None:
    write_imagefolder(tmp_path / "src")
    (tmp_path / "src" / "train" / "frog" / "0002.png").write_bytes(b"garbage")
    archive = make_tar(tmp_path / "store" / "a.tar.gz", tmp_path / "src", "cifar10")
    with pytest.raises(DatasetError, match="cannot decode image") as info:
        load_cifar10(tmp_path / "store", cache_dir=tmp_path / "cache", progress=False)
    assert f"{archive}:cifar10/train/frog/0002.png" in str(info.value)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


def test_cifar10_archive_missing_class_folder(tmp_path: Path) -> None:
    write_imagefolder(tmp_path / "src")
    for f in (tmp_path / "src" / "test" / "bird").iterdir():
        f.unlink()
    archive = make_tar(tmp_path / "a.tar.gz", tmp_path / "src", ".")
    with pytest.raises(DatasetError, match="missing: bird") as info:
        load_cifar10(archive, cache_dir=tmp_path / "cache")
    assert f"{archive}:test" in str(info.value)


def test_cifar10_archive_without_dataset(tmp_path: Path) -> None:
    (tmp_path / "src" / "stuff").mkdir(parents=True)
    (tmp_path / "src" / "stuff" / "readme.txt").write_text("hello")
    archive = make_tar(tmp_path / "junk.tar.gz", tmp_path / "src", ".")
    with pytest.raises(DatasetError, match="holds neither") as info:
        load_cifar10(archive, cache_dir=tmp_path / "cache")
    assert str(archive) in str(info.value)


def test_cifar10_truncated_archive(tmp_path: Path) -> None:
    write_imagefolder(tmp_path / "src")
    archive = make_tar(tmp_path / "a.tar.gz", tmp_path / "src", ".")
    archive.write_bytes(archive.read_bytes()[:2000])
    with pytest.raises(DatasetError, match="cannot read the archive"):
        load_cifar10(archive, cache_dir=tmp_path / "cache")


# ---------------------------------------------------------------- CIFAR-10: missing, download


def test_cifar10_empty_dir_message(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as info:
        load_cifar10(tmp_path, cache_dir=tmp_path / "cache")
    msg = str(info.value)
    assert str(tmp_path) in msg
    assert str(tmp_path / "cifar-10-batches-py") in msg
    assert str(tmp_path / "train") in msg and "tar.gz" in msg and "--download" in msg
    assert isinstance(info.value, ValueError)


def test_cifar10_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        load_cifar10(tmp_path / "nowhere", cache_dir=tmp_path / "cache")


def test_cifar10_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, bool]] = []
    exp: dict[str, np.ndarray] = {}

    class FakeCIFAR10:
        def __init__(self, root: str, train: bool, download: bool) -> None:
            calls.append((root, train))
            if not (Path(root) / "cifar-10-batches-py").exists():
                exp.update(write_official(Path(root)))

    fake_datasets = types.ModuleType("torchvision.datasets")
    fake_datasets.CIFAR10 = FakeCIFAR10  # type: ignore[attr-defined]
    fake = types.ModuleType("torchvision")
    fake.datasets = fake_datasets  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", fake_datasets)

    root = tmp_path / "fresh"
    s = load_cifar10(root, download=True, cache_dir=tmp_path / "cache")
    assert calls == [(str(root), True), (str(root), False)]
    assert torch.equal(s.test_y, torch.from_numpy(exp["test_y"]))
    load_cifar10(root, download=True, cache_dir=tmp_path / "cache")
    assert len(calls) == 2  # found, so not downloaded again


def test_cifar10_download_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class OfflineCIFAR10:
        def __init__(self, root: str, train: bool, download: bool) -> None:
            raise OSError("network unreachable")

    fake_datasets = types.ModuleType("torchvision.datasets")
    fake_datasets.CIFAR10 = OfflineCIFAR10  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torchvision", types.ModuleType("torchvision"))
    monkeypatch.setitem(sys.modules, "torchvision.datasets", fake_datasets)
    with pytest.raises(DatasetError, match="network unreachable"):
        load_cifar10(tmp_path, download=True, cache_dir=tmp_path / "cache")


# ---------------------------------------------------------------- load_dataset


def test_load_dataset_dispatch(tmp_path: Path) -> None:
    assert torch.equal(load_dataset("digits", seed=3).train_x, load_digits(seed=3).train_x)
    write_official(tmp_path)
    s = load_dataset("cifar10", tmp_path, progress=False, cache_dir=tmp_path / "cache")
    assert s.name == "cifar10" and len(s.train_y) == 90
    with pytest.raises(ValueError, match="digits, cifar10"):
        load_dataset("mnist")
