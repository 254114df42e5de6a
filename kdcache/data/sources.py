"""Dataset sources: read a dataset in its native layout into uint8 arrays.

Every source returns a `RawDataset`: train and test splits as uint8 images
[N, H, W, C] (C is 1 or 3, as stored by the source) with int64 labels, plus the class
names. Channel expansion and resizing to a common size happen later, in one place
(`kdcache.data.prepare`), so each source only has to parse its format.
"""

from __future__ import annotations

import gzip
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from kdcache.errors import KdcacheError

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


@dataclass
class Split:
    images: np.ndarray  # uint8 [N, H, W, C], C in {1, 3}
    labels: np.ndarray  # int64 [N]


@dataclass
class RawDataset:
    train: Split
    test: Split
    class_names: list[str]
    root: str  # where the data was read from, recorded in meta.json
    preprocessing: str = ""  # what the source itself did to the pixels, if anything
    # (mean, std) the model zoos hard-code for this dataset; prepare records them instead of
    # recomputing, so a released teacher sees exactly the inputs it was trained with.
    normalization: tuple[list[float], list[float]] | None = None


# CIFAR-100: RepDistiller's and mdistiller's (CRLD's) transforms. CIFAR-10: neither zoo has
# CIFAR-10; forks of mdistiller disagree, so we take the training set's own statistics as
# usually published, which those forks that do not reuse the CIFAR-100 values use.
CIFAR100_NORMALIZATION = ([0.5071, 0.4867, 0.4408], [0.2675, 0.2565, 0.2761])
CIFAR10_NORMALIZATION = ([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616])


SourceFn = Callable[["Path | None", "int | None"], RawDataset]
SOURCES: dict[str, SourceFn] = {}


def register(name: str):
    """Adds a reader to the registry under `name` (the SOURCE argument of `data prepare`)."""
    def wrap(fn: SourceFn) -> SourceFn:
        SOURCES[name] = fn
        return fn
    return wrap


def list_sources() -> list[str]:
    return sorted(SOURCES)


def read_source(name: str, root: Path | None, size: int | None) -> RawDataset:
    """Reads source `name` from `root`; `size` is only used by sources that must decode to a size."""
    if name not in SOURCES:
        raise KdcacheError(f"unknown dataset source {name!r}; choose one of: {', '.join(list_sources())}")
    data = SOURCES[name](root, size)
    for split_name, split in (("train", data.train), ("test", data.test)):
        _check_split(name, split_name, split, len(data.class_names))
    return data


def _check_split(name: str, split_name: str, split: Split, num_classes: int) -> None:
    x, y = split.images, split.labels
    if len(x) == 0:
        raise KdcacheError(f"{name}: the {split_name} split is empty; check the source files")
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[3] not in (1, 3):
        raise KdcacheError(f"{name}: {split_name} images must be uint8 [N,H,W] or [N,H,W,1|3], got {x.dtype} {list(x.shape)}")
    if y.shape != (len(x),):
        raise KdcacheError(f"{name}: {split_name} has {len(x)} images but labels of shape {list(y.shape)}")
    if y.min() < 0 or y.max() >= num_classes:
        raise KdcacheError(f"{name}: {split_name} labels must lie in 0..{num_classes - 1}, found {y.min()}..{y.max()}")


def _require_root(name: str, root: Path | None) -> Path:
    if root is None:
        raise KdcacheError(f"{name} needs --root DIR pointing at the dataset files")
    if not root.is_dir():
        raise KdcacheError(f"{name}: --root {root} is not a directory")
    return root


def _to_nhwc(images: np.ndarray) -> np.ndarray:
    return images[..., None] if images.ndim == 3 else images


# ---------------------------------------------------------------- CIFAR pickles

def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except FileNotFoundError:
        raise KdcacheError(f"missing file {path}") from None
    except Exception as err:  # truncated or not a pickle
        raise KdcacheError(f"cannot read {path} ({type(err).__name__}): the file is corrupt or truncated; download it again") from None


def _cifar_batch(path: Path, label_key: bytes) -> Split:
    d = _unpickle(path)
    if b"data" not in d or label_key not in d:
        raise KdcacheError(f"{path} is not a CIFAR batch (needs keys b'data' and {label_key!r})")
    data = np.asarray(d[b"data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3072:
        raise KdcacheError(f"{path}: b'data' must be [N, 3072] uint8, got {list(data.shape)}")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return Split(np.ascontiguousarray(images), np.asarray(d[label_key], dtype=np.int64))


def _concat(splits: list[Split]) -> Split:
    return Split(np.concatenate([s.images for s in splits]), np.concatenate([s.labels for s in splits]))


def _cifar_dir(name: str, root: Path | None, folder: str, marker: str, tv_class: str) -> Path:
    """Finds the pickle folder under root (or root itself); downloads it with torchvision if absent."""
    root = _require_root(name, root)
    for d in (root / folder, root):
        if (d / marker).exists():
            return d
    import torchvision.datasets

    try:
        getattr(torchvision.datasets, tv_class)(str(root), train=True, download=True)
    except Exception as err:
        raise KdcacheError(
            f"{name}: files missing under {root} and the download failed ({type(err).__name__}); "
            f"put the extracted '{folder}' folder (python pickle version) in {root}"
        ) from None
    return root / folder


@register("cifar10")
def cifar10(root: Path | None, size: int | None) -> RawDataset:
    d = _cifar_dir("cifar10", root, "cifar-10-batches-py", "batches.meta", "CIFAR10")
    train = _concat([_cifar_batch(d / f"data_batch_{i}", b"labels") for i in range(1, 6)])
    test = _cifar_batch(d / "test_batch", b"labels")
    names = _unpickle(d / "batches.meta").get(b"label_names")
    if names is None:
        raise KdcacheError(f"{d / 'batches.meta'} lacks b'label_names'")
    return RawDataset(train, test, [n.decode() for n in names], str(d), normalization=CIFAR10_NORMALIZATION)


@register("cifar100")
def cifar100(root: Path | None, size: int | None) -> RawDataset:
    d = _cifar_dir("cifar100", root, "cifar-100-python", "meta", "CIFAR100")
    train = _cifar_batch(d / "train", b"fine_labels")
    test = _cifar_batch(d / "test", b"fine_labels")
    names = _unpickle(d / "meta").get(b"fine_label_names")
    if names is None:
        raise KdcacheError(f"{d / 'meta'} lacks b'fine_label_names'")
    return RawDataset(train, test, [n.decode() for n in names], str(d), normalization=CIFAR100_NORMALIZATION)


# ---------------------------------------------------------------- idx (MNIST family)

IDX_UBYTE_MAGIC = {1: 0x801, 3: 0x803}  # labels: 1 dim, images: 3 dims


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Reads an idx file (`path` or `path.gz`): big-endian magic, dims, then uint8 data."""
    candidates = [path, path.with_name(path.name + ".gz")]
    found = next((p for p in candidates if p.exists()), None)
    if found is None:
        raise KdcacheError(f"missing file {path} (or {path.name}.gz)")
    try:
        raw = gzip.decompress(found.read_bytes()) if found.suffix == ".gz" else found.read_bytes()
    except (OSError, EOFError) as err:
        raise KdcacheError(f"cannot decompress {found} ({err}); the file is corrupt or truncated") from None
    header = 4 + 4 * ndim
    if len(raw) < header or int.from_bytes(raw[:4], "big") != IDX_UBYTE_MAGIC[ndim]:
        raise KdcacheError(f"{found} is not a uint8 idx file with {ndim} dimension(s) (bad magic number)")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    if len(raw) != header + int(np.prod(dims)):
        raise KdcacheError(f"{found} is truncated: header says {dims}, file holds {len(raw) - header} bytes of data")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _idx_split(root: Path, prefix: str) -> Split:
    images = read_idx(root / f"{prefix}-images-idx3-ubyte", 3)
    labels = read_idx(root / f"{prefix}-labels-idx1-ubyte", 1).astype(np.int64)
    return Split(_to_nhwc(images), labels)


def _idx_dataset(name: str, root: Path, class_names: list[str]) -> RawDataset:
    root = _require_root(name, root)
    return RawDataset(_idx_split(root, "train"), _idx_split(root, "t10k"), class_names, str(root))


@register("fashion-mnist")
def fashion_mnist(root: Path | None, size: int | None) -> RawDataset:
    """Default root: Debian's dataset-fashion-mnist package."""
    return _idx_dataset("fashion-mnist", root or Path(FASHION_MNIST_ROOT), FASHION_MNIST_CLASSES)


@register("mnist")
def mnist(root: Path | None, size: int | None) -> RawDataset:
    return _idx_dataset("mnist", root, [str(i) for i in range(10)])


# ---------------------------------------------------------------- ImageFolder

def _folder_split(split_dir: Path, class_names: list[str], size: int) -> Split:
    from kdcache.data.transform import load_image

    images, labels = [], []
    for label, cls in enumerate(class_names):
        cls_dir = split_dir / cls
        if not cls_dir.is_dir():
            continue
        for f in sorted(p for p in cls_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            images.append(load_image(f, size))
            labels.append(label)
    if not images:
        raise KdcacheError(f"no .jpg/.jpeg/.png images under {split_dir}/<class>/")
    return Split(np.stack(images), np.asarray(labels, dtype=np.int64))


@register("imagefolder")
def imagefolder(root: Path | None, size: int | None) -> RawDataset:
    """root/train/<class>/*.{jpg,png} and root/val (or root/test)/<class>/...; classes sorted by name.

    Images are decoded to RGB and resized (shorter side) then center-cropped to --size,
    which is required because the source images differ in size.
    """
    root = _require_root("imagefolder", root)
    if size is None:
        raise KdcacheError("imagefolder needs --size N: images are resized and center-cropped to N x N")
    train_dir = root / "train"
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise KdcacheError(f"imagefolder expects {root}/train/<class>/ and {root}/val/<class>/ (or test/)")
    class_names = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    extra = sorted({p.name for p in test_dir.iterdir() if p.is_dir()} - set(class_names))
    if extra:
        raise KdcacheError(f"{test_dir} has classes missing from {train_dir}: {', '.join(extra[:5])}")
    return RawDataset(_folder_split(train_dir, class_names, size), _folder_split(test_dir, class_names, size),
                      class_names, str(root), f"decode RGB, resize shorter side + centre-crop to {size}x{size}")


# ---------------------------------------------------------------- scikit-learn digits

@register("digits")
def digits(root: Path | None, size: int | None) -> RawDataset:
    """scikit-learn's 1797 8x8 digits, values 0..16 scaled to 0..255 (round(v * 255 / 16)).

    Deterministic split: sample i goes to test when i % 5 == 4 (359 test, 1438 train),
    keeping both splits spread over the whole (writer-ordered) file.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = d.target.astype(np.int64)
    is_test = np.arange(len(labels)) % 5 == 4
    return RawDataset(Split(images[~is_test], labels[~is_test]), Split(images[is_test], labels[is_test]),
                      [str(i) for i in range(10)], "sklearn.datasets.load_digits")


# ---------------------------------------------------------------- npz arrays

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


@register("npz")
def npz(root: Path | None, size: int | None) -> RawDataset:
    """--root FILE.npz with x_train, x_test (uint8 [N,H,W] or [N,H,W,1|3]), y_train, y_test
    (integer [N]) and optionally class_names (strings); without it classes are "0".."K-1"."""
    if root is None or not root.is_file():
        raise KdcacheError(f"npz needs --root FILE.npz holding {', '.join(NPZ_KEYS)}; got {root}")
    try:
        with np.load(root, allow_pickle=False) as f:
            missing = [k for k in NPZ_KEYS if k not in f.files]
            if missing:
                raise KdcacheError(f"{root} lacks the arrays {', '.join(missing)} (needs {', '.join(NPZ_KEYS)})")
            arrays = {k: f[k] for k in f.files}
    except KdcacheError:
        raise
    except Exception as err:
        raise KdcacheError(f"cannot read {root} as .npz ({type(err).__name__}); the file is corrupt or truncated") from None
    for k in ("y_train", "y_test"):
        if not np.issubdtype(arrays[k].dtype, np.integer):
            raise KdcacheError(f"{root}: {k} must hold integer labels, got {arrays[k].dtype}")
    if "class_names" in arrays:
        class_names = [str(c) for c in arrays["class_names"]]
    else:
        class_names = [str(i) for i in range(int(max(arrays["y_train"].max(initial=0), arrays["y_test"].max(initial=0))) + 1)]
    train, test = (Split(_to_nhwc(arrays[f"x_{s}"]), arrays[f"y_{s}"].astype(np.int64)) for s in ("train", "test"))
    return RawDataset(train, test, class_names, str(root))
