"""Contact sheets of uint8 images, for looking at views."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kdcache.errors import KdcacheError


def render_grid(images: torch.Tensor, path, ncol: int, scale: int = 1, gap: int = 2) -> Path:
    """Write uint8 [N,3,H,W] images as a PNG grid, ncol per row, each upscaled by `scale`."""
    path = Path(path)
    if not path.parent.is_dir():
        raise KdcacheError(f"cannot write {path}: folder {path.parent} does not exist")
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3 or len(images) == 0:
        raise ValueError(f"expected non-empty uint8 [N, 3, H, W] images, got {images.dtype} {tuple(images.shape)}")
    n, _, h, w = images.shape
    tiles = images.cpu().repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    th, tw = h * scale, w * scale
    nrow = -(-n // ncol)
    sheet = np.full((nrow * (th + gap) + gap, ncol * (tw + gap) + gap, 3), 255, dtype=np.uint8)
    for i, tile in enumerate(tiles.permute(0, 2, 3, 1).numpy()):
        r, c = divmod(i, ncol)
        y, x = gap + r * (th + gap), gap + c * (tw + gap)
        sheet[y:y + th, x:x + tw] = tile
    Image.fromarray(sheet).save(path, format="PNG")
    return path
