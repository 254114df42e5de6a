"""The .beton files kdcache writes (fields image, label, index) and a numpy reader for them.

JPEG betons are written by ffcv's DatasetWriter. Raw-image betons need no ffcv, to write or
to read: the layout below mirrors ffcv 1.0.2's `ffcv/types.py`, `ffcv/writer.py` and
`ffcv/reader.py` (format version 2), so machines without ffcv (a GPU box where it will not
build) can still prepare CIFAR-sized data and load a split into memory:

    header      version u2, num_fields u2, page_size u4, num_samples u8, alloc_table_ptr u8
    fields      num_fields x (type_id u1, name u1[16], arguments u1[1024])
    metadata    num_samples x aligned struct of each field's metadata, in field order;
                RGBImageField: (mode u1, width u2, height u2, data_ptr u8) packed,
                IntField: i8
    data pages  from the first page boundary after the metadata, whole pages of page_size
                bytes; raw images: H*W*3 bytes, HWC RGB, at data_ptr, never across pages
    alloc table (sample_id u8, ptr u8, size u8) per allocation, at alloc_table_ptr

JPEG-encoded betons are decoded with ffcv itself (see `kdcache.data.loaders`), so the
pixels never depend on which JPEG decoder a machine happens to have.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from kdcache.errors import KdcacheError

FIELDS = ("image", "label", "index")
FORMAT_VERSION = 2
TYPE_RGB_IMAGE, TYPE_INT = 2, 1
MODE_RAW = 1  # RGBImageField metadata mode (0 is JPEG)
ALLOC_ENTRY_BYTES = 24  # one (sample_id, ptr, size) entry per image allocation
PAGE_SIZE = 1 << 21  # ffcv's minimum; its 8 MiB default bloats small datasets
CHECKED_IMAGES = 64  # images whose stored bytes `content_check` hashes

HEADER = np.dtype([("version", "<u2"), ("num_fields", "<u2"), ("page_size", "<u4"),
                   ("num_samples", "<u8"), ("alloc_table_ptr", "<u8")], align=True)
FIELD_DESC = np.dtype([("type_id", "<u1"), ("name", ("<u1", 16)), ("arguments", ("<u1", (1024,)))], align=True)
IMAGE_META = np.dtype([("mode", "<u1"), ("width", "<u2"), ("height", "<u2"), ("data_ptr", "<u8")])
SAMPLE_META = np.dtype([("", IMAGE_META), ("", "<i8"), ("", "<i8")], align=True)


JPEG_QUALITY = 90


@contextmanager
def torch_threads_kept():
    """ffcv sets torch's thread count for the whole process (to 1 when its compiler module is
    first imported, to a Loader's num_workers on every pass): a run's speed and its bits
    must not depend on whether ffcv ran before, so every use of ffcv goes through this."""
    import torch

    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def write_beton(path: Path, samples, *, jpeg: bool, num_workers: int, page_size: int = PAGE_SIZE,
                chunksize: int = 1000) -> None:
    """Writes `samples` (indexable, len N, item i = (uint8 HWC RGB image, label, i)) to `path`.
    JPEG: ffcv's workers call `samples[i]` themselves, so images may be loaded one at a time
    there; a worker that raises leaves ffcv's writer waiting forever, so `samples` must not
    raise. Raw: written here, in one process. Every stored image must fit in one page."""
    if not jpeg:
        write_raw_beton(path, samples, page_size)
        return
    with torch_threads_kept():
        from ffcv.fields import IntField, RGBImageField
        from ffcv.writer import DatasetWriter

        fields = {"image": RGBImageField(write_mode="jpg" if jpeg else "raw", jpeg_quality=JPEG_QUALITY),
                  "label": IntField(), "index": IntField()}
        writer = DatasetWriter(str(path), fields, page_size=page_size, num_workers=num_workers)
        writer.from_indexed_dataset(samples, chunksize=chunksize)


def write_raw_beton(path: Path, samples, page_size: int = PAGE_SIZE) -> None:
    """The file ffcv's DatasetWriter writes with one worker and RGBImageField(write_mode="raw"),
    byte for byte (tested), without ffcv: images are packed into whole pages in index order,
    a new page begun when the next image would not fit. Each sample is read once."""
    n = len(samples)
    sample_0 = samples[0] if n else None  # read once: reading a sample may count it (FileSamples' histogram)
    first = sample_0[0] if n else None
    if first is None or first.ndim != 3 or first.shape[2] != 3:
        raise KdcacheError(f"{path.name}: raw betons need uint8 HWC RGB images and at least one sample")
    height, width = first.shape[:2]
    nbytes = height * width * 3
    if nbytes > page_size:
        raise KdcacheError(f"{path.name}: a {height}x{width} image ({nbytes} bytes) does not fit a page of {page_size}")
    per_page = page_size // nbytes
    fields = np.zeros(len(FIELDS), dtype=FIELD_DESC)
    for desc, name, type_id in zip(fields, FIELDS, (TYPE_RGB_IMAGE, TYPE_INT, TYPE_INT)):
        desc["type_id"] = type_id
        desc["name"][:len(name)] = np.frombuffer(name.encode("ascii"), dtype="<u1")
    meta = np.zeros(n, dtype=SAMPLE_META)
    data_start = HEADER.itemsize + fields.nbytes + meta.nbytes
    data_start += -data_start % page_size
    slots = np.arange(n, dtype=np.int64)
    ptrs = data_start + (slots // per_page) * page_size + (slots % per_page) * nbytes
    table = np.zeros((n, 3), dtype="<u8")
    table[:, 0], table[:, 1], table[:, 2] = slots, ptrs, nbytes
    page = np.zeros(page_size, dtype=np.uint8)
    with open(path, "wb") as f:
        f.seek(data_start)
        for start in range(0, n, per_page):
            page.fill(0)
            for k, i in enumerate(range(start, min(start + per_page, n))):
                image, label, index = sample_0 if i == 0 else samples[i]
                if image.shape != first.shape or image.dtype != np.uint8:
                    raise KdcacheError(f"{path.name}: sample {i} is {image.dtype} {image.shape}, not uint8 {first.shape}")
                page[k * nbytes:(k + 1) * nbytes] = np.ascontiguousarray(image).reshape(-1)
                meta[i] = ((MODE_RAW, width, height, ptrs[i]), label, index)
            f.write(page.tobytes())
        table_ptr = f.tell()
        f.write(table.tobytes())
        header = np.zeros(1, dtype=HEADER)
        header[0] = (FORMAT_VERSION, len(FIELDS), page_size, n, table_ptr)
        f.seek(0)
        f.write(header.tobytes() + fields.tobytes() + meta.tobytes())


class ArraySamples:
    """Indexable (image, label, index) view of the arrays, read by ffcv's forked writer workers."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i]), int(i)


class BetonFile:
    """Parsed header and per-sample metadata of one kdcache .beton."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise KdcacheError(f"missing {self.path}; run `kdcache data prepare` first")
        self.size = self.path.stat().st_size
        try:
            header = np.fromfile(self.path, dtype=HEADER, count=1)[0]
            fields = np.fromfile(self.path, dtype=FIELD_DESC, count=int(header["num_fields"]), offset=HEADER.itemsize)
        except (ValueError, IndexError):
            self._corrupt("header")
        if len(fields) != header["num_fields"]:
            self._corrupt("field descriptors")
        names = tuple(bytes(f["name"]).rstrip(b"\0").decode("ascii", "replace") for f in fields)
        if header["version"] != FORMAT_VERSION or names != FIELDS or \
                list(fields["type_id"]) != [TYPE_RGB_IMAGE, TYPE_INT, TYPE_INT]:
            raise KdcacheError(f"{self.path} is not a kdcache beton (fields {names}); re-run `kdcache data prepare`")
        self.num_samples = int(header["num_samples"])
        if int(header["alloc_table_ptr"]) + ALLOC_ENTRY_BYTES * self.num_samples > self.size:
            self._corrupt("allocation table")
        offset = HEADER.itemsize + fields.nbytes
        if offset + self.num_samples * SAMPLE_META.itemsize > self.size:
            self._corrupt("metadata")
        meta = np.fromfile(self.path, dtype=SAMPLE_META, count=self.num_samples, offset=offset)
        self.image_meta = meta["f0"]
        self.labels = meta["f1"].astype(np.int64)
        self.indices = meta["f2"].astype(np.int64)
        self.is_raw = bool(np.all(self.image_meta["mode"] == MODE_RAW))
        self.heights = self.image_meta["height"].astype(np.int64)
        self.widths = self.image_meta["width"].astype(np.int64)
        one_size = len(np.unique(self.image_meta[["width", "height"]])) == 1
        if self.num_samples == 0 or np.any(self.heights == 0) or np.any(self.widths == 0) or \
                (self.is_raw and not one_size):
            self._corrupt("image sizes")
        # JPEG betons may keep each image at its own size (`own_size`); then height/width are None.
        self.own_size = not one_size
        self.height = None if self.own_size else int(self.heights[0])
        self.width = None if self.own_size else int(self.widths[0])

    def content_check(self) -> str:
        """A cheap hash of what the file holds: sizes, every label and index, the image
        metadata, and the stored bytes of CHECKED_IMAGES images spread over the file.
        meta.json records it at prepare time, so betons swapped under a copied meta.json
        (whose fingerprint would then vouch for other pixels) are refused on load."""
        h = hashlib.sha256(np.array([self.num_samples, self.height or 0, self.width or 0], dtype="<u8").tobytes())
        h.update(self.labels.astype("<i8").tobytes())
        h.update(self.indices.astype("<i8").tobytes())
        h.update(np.ascontiguousarray(self.image_meta).tobytes())
        picks = np.unique(np.linspace(0, self.num_samples - 1, CHECKED_IMAGES).astype(np.int64))
        ptrs = self.image_meta["data_ptr"][picks].astype(np.int64)
        sizes = self._allocation_sizes(ptrs)
        with open(self.path, "rb") as f:
            for ptr, size in zip(ptrs.tolist(), sizes.tolist()):
                f.seek(ptr)
                h.update(f.read(size))
        return h.hexdigest()

    def stored_images(self, progress: str | None = None):
        """Yields every image's stored bytes (raw pixels HWC, or a JPEG file) in index order,
        one at a time: for raw betons, together exactly the uint8 [N,H,W,3] array's bytes."""
        from tqdm import tqdm

        ptrs = self.image_meta["data_ptr"].astype(np.int64)
        sizes = self._allocation_sizes(ptrs)
        with open(self.path, "rb") as f, tqdm(total=self.num_samples, desc=progress, disable=progress is None,
                                              unit="img", leave=False) as bar:
            for start in range(0, self.num_samples, 65536):  # Python ints for one block at a time
                block = slice(start, start + 65536)
                for ptr, size in zip(ptrs[block].tolist(), sizes[block].tolist()):
                    f.seek(ptr)
                    yield f.read(size)
                bar.update(len(ptrs[block]))

    def _allocation_sizes(self, ptrs: np.ndarray) -> np.ndarray:
        """Bytes stored at each data pointer, from the allocation table."""
        header = np.fromfile(self.path, dtype=HEADER, count=1)[0]
        table = np.fromfile(self.path, dtype="<u8", count=3 * self.num_samples,
                            offset=int(header["alloc_table_ptr"])).reshape(-1, 3)
        order = np.argsort(table[:, 1])
        at = np.searchsorted(table[order, 1], ptrs)
        if np.any(at >= len(order)) or np.any(table[order[np.minimum(at, len(order) - 1)], 1] != ptrs):
            self._corrupt("allocation table")
        return table[order[at], 2].astype(np.int64)

    def _corrupt(self, part: str):
        raise KdcacheError(f"{self.path} is truncated or corrupt ({part}); re-run `kdcache data prepare --overwrite`")

    def read_raw_images(self, chunk: int = 2048) -> np.ndarray:
        """All images [N,3,H,W] uint8 in sample order, gathered from their data pointers."""
        nbytes = self.height * self.width * 3
        ptrs = self.image_meta["data_ptr"].astype(np.int64)
        if ptrs.max() + nbytes > self.size:
            self._corrupt("image data")
        data = np.memmap(self.path, dtype=np.uint8, mode="r")
        out = np.empty((self.num_samples, nbytes), dtype=np.uint8)
        step = np.arange(nbytes, dtype=np.int64)
        for start in range(0, self.num_samples, chunk):
            p = ptrs[start:start + chunk]
            out[start:start + len(p)] = data[p[:, None] + step[None, :]]
        hwc = out.reshape(self.num_samples, self.height, self.width, 3)
        return np.ascontiguousarray(hwc.transpose(0, 3, 1, 2))
