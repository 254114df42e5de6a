"""Bringing source images to the stored form: 3 channels, an optional square target size.

The rule (recorded in meta.json as `preprocessing`):
- grayscale (1 channel) is repeated to 3 identical channels;
- with `size`, an image no larger than size x size is zero-padded, centred, to size x size
  (top/left padding = (size - h) // 2, the rest at the bottom/right; Fashion-MNIST 28 -> 32
  puts 2 zero rows/columns on each side); a larger image is resized so its shorter side is
  `size` (PIL bicubic) and then centre-cropped to size x size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from kdcache.errors import KdcacheError


def to_rgb(images: np.ndarray) -> np.ndarray:
    """[N,H,W,1|3] uint8 -> [N,H,W,3] uint8."""
    return np.repeat(images, 3, axis=3) if images.shape[3] == 1 else images


def pad_center(images: np.ndarray, size: int) -> np.ndarray:
    n, h, w, c = images.shape
    top, left = (size - h) // 2, (size - w) // 2
    out = np.zeros((n, size, size, c), dtype=np.uint8)
    out[:, top:top + h, left:left + w] = images
    return out


def resize_crop(image: Image.Image, size: int) -> np.ndarray:
    """Shorter side to `size`, then the centred size x size crop, as uint8 HWC RGB."""
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.convert("RGB").resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)


def fit_to_size(images: np.ndarray, size: int | None) -> tuple[np.ndarray, str]:
    """Applies the module's rule to a batch [N,H,W,C]; returns RGB images and a description."""
    n, h, w, c = images.shape
    steps = ["gray->rgb"] if c == 1 else []
    images = to_rgb(images)
    if size is not None and (h, w) != (size, size):
        if h <= size and w <= size:
            images = pad_center(images, size)
            steps.append(f"zero-pad centred {h}x{w}->{size}x{size}")
        else:
            images = np.stack([resize_crop(Image.fromarray(im), size) for im in images])
            steps.append(f"resize shorter side + centre-crop {h}x{w}->{size}x{size}")
    return images, ", ".join(steps) or "none"


def load_image(path: Path, size: int) -> np.ndarray:
    """Decodes one image file to RGB and resizes/crops it to size x size (ImageFolder source)."""
    try:
        with Image.open(path) as im:
            return resize_crop(im, size)
    except (OSError, ValueError) as err:
        raise KdcacheError(f"cannot decode image {path} ({err}); remove or replace the file") from None
