"""Bringing source images to the stored form: 3 channels, an optional square target size.

The rule for arrays (recorded in meta.json as `preprocessing`):
- grayscale (1 channel) is repeated to 3 identical channels;
- with `size`, an image no larger than size x size is zero-padded, centred, to size x size
  (top/left padding = (size - h) // 2, the rest at the bottom/right; Fashion-MNIST 28 -> 32
  puts 2 zero rows/columns on each side); a larger image is resized so its shorter side is
  `size` (PIL bicubic) and then centre-cropped to size x size.

Image files (`load_image`) are decoded with Pillow to RGB the way torchvision's loader
does (`convert("RGB")`: gray repeated, CMYK converted), except that images with
transparency are composited over black first (what `convert` drops is arbitrary colour
under alpha 0). Then either `size` (shorter side + centre crop, as above) or `max_side`
(only images whose longer side exceeds it are shrunk, aspect kept, with OpenCV's
INTER_AREA as FFCV's `max_resolution` does) applies.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

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


def decode_rgb(path: str | Path) -> np.ndarray:
    """One image file as uint8 HWC RGB (see the module docstring), or a one-line error naming it."""
    try:
        with Image.open(path) as im:
            if "A" in im.getbands() or "transparency" in im.info:
                black = Image.new("RGBA", im.size, (0, 0, 0, 255))
                im = Image.alpha_composite(black, im.convert("RGBA"))
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise KdcacheError(f"missing file {path}; it was listed but has gone; re-run on a stable folder") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        # UnidentifiedImageError (an OSError) has a message naming a stream, not the cause.
        reason = "not an image format Pillow reads" if isinstance(err, UnidentifiedImageError) else str(err) or type(err).__name__
        raise KdcacheError(f"{path} is not a readable image ({reason}); remove or replace it") from None


def cap_side(image: np.ndarray, max_side: int) -> np.ndarray:
    """Shrinks an image whose longer side exceeds `max_side` to exactly that side, the other
    rounded (at least 1), with INTER_AREA; smaller images are returned unchanged."""
    import cv2  # comes with ffcv, which writing needs anyway; reading machines may lack it

    h, w = image.shape[:2]
    if max(h, w) <= max_side:
        return image
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def load_image(path: str | Path, size: int | None, max_side: int | None) -> np.ndarray:
    """Decodes one image file to the stored uint8 HWC RGB pixels: `size` x `size` (shorter
    side + centre crop), or its own size capped at `max_side`, or its own size."""
    image = decode_rgb(path)
    if size is not None:
        return resize_crop(Image.fromarray(image), size)
    return cap_side(image, max_side) if max_side is not None else image
