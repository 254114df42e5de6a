"""Dataset sources: read a dataset in its native layout.

Array sources (CIFAR, idx, digits, npz) return a `RawDataset`: train and test splits as
uint8 images [N, H, W, C] (C is 1 or 3, as stored by the source) with int64 labels, plus
the class names. Channel expansion and resizing to a common size happen later, in one
place (`kdcache.data.prepare`), so each source only has to parse its format.

Folder sources (imagefolder, tiny-imagenet) return a `FileDataset`: the image files'
paths and labels only, so that `prepare` can stream them (decode, write, forget) with
memory that does not grow with the pixels.
"""

from __future__ import annotations

import gzip
import os
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
# torchvision's ImageFolder extensions (IMG_EXTENSIONS), matched case-insensitively like it;
# other files (notes, Tiny-ImageNet's *_boxes.txt) are skipped.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


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


@dataclass
class FileSplit:
    paths: np.ndarray  # file paths as bytes (numpy "S": no per-path Python object to copy into workers)
    labels: np.ndarray  # int64 [N]


@dataclass
class FileDataset:
    train: FileSplit
    test: FileSplit
    class_names: list[str]
    root: str
    normalization: tuple[list[float], list[float]] | None = None  # as in RawDataset
    sizes_vary: bool = True  # images may differ in size: stored as JPEG at their own size by default


# torchvision's published ImageNet statistics: what torchvision's and timm's ImageNet teachers expect.
IMAGENET_NORMALIZATION = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
# mdistiller's Tiny-ImageNet transforms (mdistiller/dataset/tiny_imagenet.py).
TINY_IMAGENET_NORMALIZATION = ([0.4802, 0.4481, 0.3975], [0.2302, 0.2265, 0.2262])

# CIFAR-100: RepDistiller's and mdistiller's (CRLD's) transforms. CIFAR-10: neither zoo has
# CIFAR-10; forks of mdistiller disagree, so we take the training set's own statistics as
# usually published, which those forks that do not reuse the CIFAR-100 values use.
CIFAR100_NORMALIZATION = ([0.5071, 0.4867, 0.4408], [0.2675, 0.2565, 0.2761])
CIFAR10_NORMALIZATION = ([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616])


SourceFn = Callable[["Path | None", "int | None"], "RawDataset | FileDataset"]
SOURCES: dict[str, SourceFn] = {}


def register(name: str):
    """Adds a reader to the registry under `name` (the SOURCE argument of `data prepare`)."""
    def wrap(fn: SourceFn) -> SourceFn:
        SOURCES[name] = fn
        return fn
    return wrap


def list_sources() -> list[str]:
    return sorted(SOURCES)


def read_source(name: str, root: Path | None, size: int | None) -> RawDataset | FileDataset:
    """Reads source `name` from `root`; `size` is only used by sources that must decode to a size."""
    if name not in SOURCES:
        raise KdcacheError(f"unknown dataset source {name!r}; choose one of: {', '.join(list_sources())}")
    data = SOURCES[name](root, size)
    if isinstance(data, RawDataset):
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


# ---------------------------------------------------------------- image folders

def image_files(directory: Path) -> list[str]:
    """Image files under `directory`, recursively, in torchvision ImageFolder's order
    (sorted os.walk, then sorted names), so sample indices match torchvision's."""
    return [os.path.join(d, f) for d, _, names in sorted(os.walk(directory, followlinks=True))
            for f in sorted(names) if f.lower().endswith(IMAGE_SUFFIXES)]


def _file_split(files: list[tuple[str, int]]) -> FileSplit:
    paths = np.array([os.fsencode(f) for f, _ in files], dtype=np.bytes_)
    return FileSplit(paths, np.array([label for _, label in files], dtype=np.int64))


def _class_folders(split_dir: Path, class_names: list[str], every_class: bool) -> FileSplit:
    """split_dir/<class>/**/<image> for each class; with `every_class`, a class folder
    without images is an error (it could never be learned)."""
    files = []
    for label, cls in enumerate(class_names):
        found = image_files(split_dir / cls)
        if not found and every_class:
            raise KdcacheError(f"{split_dir / cls} holds no images ({', '.join(IMAGE_SUFFIXES)}); "
                               "add images or remove the folder")
        files += [(f, label) for f in found]
    if not files:
        raise KdcacheError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {split_dir}/<class>/")
    return _file_split(files)


def _subfolders(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.is_dir())


@register("imagefolder")
def imagefolder(root: Path | None, size: int | None) -> FileDataset:
    """root/train/<class>/**/*.jpg (and torchvision's other image extensions) and
    root/val (or root/test)/<class>/...: torchvision ImageFolder's layout, class order
    (sorted folder names) and file order. Images keep their own sizes unless --size.
    Default mean/std: torchvision's ImageNet values, which its and timm's teachers expect.
    """
    root = _require_root("imagefolder", root)
    train_dir = root / "train"
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise KdcacheError(f"imagefolder expects {root}/train/<class>/ and {root}/val/<class>/ (or test/)")
    class_names = _subfolders(train_dir)
    if len(class_names) < 2:
        raise KdcacheError(f"{train_dir} needs one folder per class (at least 2), found {len(class_names)}")
    extra = sorted(set(_subfolders(test_dir)) - set(class_names))
    if extra:
        raise KdcacheError(f"{test_dir} has classes missing from {train_dir}: {', '.join(extra[:5])}")
    return FileDataset(_class_folders(train_dir, class_names, every_class=True),
                       _class_folders(test_dir, class_names, every_class=False),
                       class_names, str(root), IMAGENET_NORMALIZATION)


def _lines(path: Path) -> list[str]:
    try:
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        raise KdcacheError(f"missing file {path}; --root must be the extracted tiny-imagenet-200 folder") from None
    except (OSError, UnicodeDecodeError) as err:
        raise KdcacheError(f"cannot read {path} ({err}); extract tiny-imagenet-200.zip again") from None


@register("tiny-imagenet")
def tiny_imagenet(root: Path | None, size: int | None) -> FileDataset:
    """Tiny-ImageNet-200 as released: wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG
    labelled by val/val_annotations.txt (file, wnid, box, tab-separated), words.txt (optional)
    naming classes. Classes are the wnids sorted, as torchvision's ImageFolder (which mdistiller
    uses) orders them; train files in ImageFolder's order; val sorted by (class, file name), the
    order ImageFolder gives the val/<wnid>/ folders mdistiller's setup makes. The test split is
    val (the released test images have no labels). Default mean/std: mdistiller's.
    """
    root = _require_root("tiny-imagenet", root)
    wnids = sorted(set(_lines(root / "wnids.txt")))
    if len(wnids) < 2:
        raise KdcacheError(f"{root / 'wnids.txt'} lists {len(wnids)} class(es); it needs one wnid per line")
    label_of = {w: i for i, w in enumerate(wnids)}
    train = _class_folders(root / "train", wnids, every_class=True)
    images = root / "val" / "images"
    val = []
    for n, line in enumerate(_lines(root / "val" / "val_annotations.txt"), 1):
        name, wnid = (line.split("\t") + [""])[:2]
        if wnid not in label_of:
            raise KdcacheError(f"{root / 'val' / 'val_annotations.txt'} line {n}: {wnid!r} is not in wnids.txt")
        if not (images / name).is_file():
            raise KdcacheError(f"missing file {images / name} (listed in val_annotations.txt line {n})")
        val.append((label_of[wnid], name))
    if not val:
        raise KdcacheError(f"{root / 'val' / 'val_annotations.txt'} lists no images")
    val = _file_split([(str(images / name), label) for label, name in sorted(val)])
    words = dict(line.split("\t", 1) for line in _lines(root / "words.txt") if "\t" in line) \
        if (root / "words.txt").is_file() else {}
    return FileDataset(train, val, [words.get(w, w) for w in wnids], str(root), TINY_IMAGENET_NORMALIZATION,
                       sizes_vary=False)


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
