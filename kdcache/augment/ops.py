"""Batched image ops on uint8 [N, 3, H, W] with one parameter per sample.

Each op computes in float32 (float64 where exactness needs it) and rounds back to
uint8 once, the way torchvision's tensor kernels (which emulate PIL) do; the tests
compare every op with torchvision's per-image kernel. Only elementwise ops, gathers,
integer histograms and exact-integer matmuls are used, so a sample's result does not
depend on which other samples share its batch.
"""

import math

import torch
import torch.nn.functional as F

# RandAugment op pool, in the order their ids are drawn (part of the policy format).
OPS = (
    "AutoContrast", "Equalize", "Identity", "Brightness", "Color", "Contrast", "Sharpness",
    "Posterize", "Rotate", "ShearX", "ShearY", "Solarize", "TranslateX", "TranslateY",
)
# Magnitude range of each op: (low, high, integer). Integer ops draw from {low..high}.
OP_RANGES = {
    "AutoContrast": (0.0, 0.0, False), "Equalize": (0.0, 0.0, False), "Identity": (0.0, 0.0, False),
    "Brightness": (0.05, 0.95, False), "Color": (0.05, 0.95, False),
    "Contrast": (0.05, 0.95, False), "Sharpness": (0.05, 0.95, False),
    "Posterize": (4.0, 8.0, True), "Rotate": (-30.0, 30.0, False),
    "ShearX": (-0.3, 0.3, False), "ShearY": (-0.3, 0.3, False), "Solarize": (0.0, 256.0, False),
    "TranslateX": (-0.3, 0.3, False), "TranslateY": (-0.3, 0.3, False),
}
GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")

# Fixed-point precision of the resampling weights (PIL's PRECISION_BITS).
_PRECISION_BITS = 22


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    """[N] parameters as float32 [N, 1, 1, 1], broadcasting over an image batch."""
    return values.to(torch.float32).view(-1, 1, 1, 1)


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Clamp and truncate, like torchvision's blends and PIL's integer casts."""
    return x.clamp_(0, 255).to(torch.uint8)


def _blend(x: torch.Tensor, other: torch.Tensor | float, ratio: torch.Tensor) -> torch.Tensor:
    """PIL's ImageEnhance: x * ratio + other * (1 - ratio), ratio float64 [N]."""
    return _to_uint8(x * _per_sample(ratio) + other * _per_sample(1.0 - ratio))


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """Floored ITU-R 601 luma of float RGB [N,3,H,W] -> [N,1,H,W] (torchvision's weights)."""
    r, g, b = x.unbind(1)
    return (r * 0.2989 + g * 0.587 + b * 0.114).floor_().unsqueeze(1)


def brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(images.float(), 0.0, factor)


def color(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    x = images.float()
    return _blend(x, _grayscale(x), factor)


def contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    x = images.float()
    # Integer sum in float64 is exact, so the mean does not depend on reduction order.
    mean = _grayscale(x).double().mean(dim=(1, 2, 3), keepdim=True).float()
    return _blend(x, mean, factor)


def sharpness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with PIL's SMOOTH filter (3x3, centre 5, others 1, /13); border pixels kept."""
    x = images.float()
    h, w = x.shape[-2:]
    if h <= 2 or w <= 2:
        return images.clone()
    total = 4 * x[:, :, 1:-1, 1:-1]
    for dy in range(3):
        for dx in range(3):
            total = total + x[:, :, dy:dy + h - 2, dx:dx + w - 2]
    smooth = x.clone()
    # Exact integer sums / 13 never land on .5, so rounding is unambiguous.
    smooth[:, :, 1:-1, 1:-1] = (total / 13).round_()
    return _blend(x, smooth, factor)


def posterize(images: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keep the top `bits` bits of each channel value."""
    mask = (255 - (2 ** (8 - bits.to(torch.int64)) - 1)).to(torch.uint8).view(-1, 1, 1, 1)
    return images & mask


def solarize(images: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Invert values >= threshold (threshold 256 leaves the image unchanged)."""
    return torch.where(images >= threshold.view(-1, 1, 1, 1), 255 - images, images)


def autocontrast(images: torch.Tensor) -> torch.Tensor:
    """Stretch each channel to 0..255; constant channels unchanged (torchvision arithmetic)."""
    x = images.float()
    low = x.amin(dim=(2, 3), keepdim=True)
    high = x.amax(dim=(2, 3), keepdim=True)
    flat = high == low
    inv_scale = torch.where(flat, 1.0, (high - low) * (1.0 / 255))
    low = torch.where(flat, 0.0, low)
    return _to_uint8((x - low) / inv_scale)


def equalize(images: torch.Tensor) -> torch.Tensor:
    """PIL's ImageOps.equalize per channel, from per-sample histograms (one bincount)."""
    n, c, h, w = images.shape
    flat = images.reshape(n * c, h * w).to(torch.int64)
    offsets = torch.arange(n * c, device=images.device)[:, None] * 256
    hist = torch.bincount((flat + offsets).reshape(-1), minlength=n * c * 256).view(n * c, 256)
    # PIL: step = (pixels - count of the last non-empty bin) // 255.
    last = 255 - (hist.flip(1) > 0).to(torch.int64).argmax(dim=1, keepdim=True)
    step = (h * w - hist.gather(1, last)) // 255
    # lut[i] = (step // 2 + pixels below value i) // step, clipped to 255.
    below = hist.cumsum(1) - hist
    lut = ((below + step // 2) // step.clamp(min=1)).clamp_(max=255)
    lut = torch.where(step > 0, lut, torch.arange(256, device=images.device))
    return lut.gather(1, flat).to(torch.uint8).view(n, c, h, w)


def affine_matrices(op_index: torch.Tensor, magnitude: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse maps [N, 2, 3] (output -> input pixel coords, origin at the image centre).

    PIL's conventions: Rotate turns counter-clockwise about the centre; ShearX/Y shear
    about the top-left corner (PIL AFFINE (1, v, 0, 0, 1, 0)); TranslateX/Y sample the
    input at x + v * width.
    """
    n = op_index.shape[0]
    m = torch.zeros(n, 2, 3, dtype=torch.float64, device=magnitude.device)
    m[:, 0, 0] = 1.0
    m[:, 1, 1] = 1.0
    name_of = {name: op_index == OPS.index(name) for name in GEOMETRIC}
    rad = magnitude * (math.pi / 180.0)
    cos, sin = torch.cos(rad), torch.sin(rad)
    rot = name_of["Rotate"]
    m[:, 0, 0] = torch.where(rot, cos, m[:, 0, 0])
    m[:, 0, 1] = torch.where(rot, -sin, m[:, 0, 1])
    m[:, 1, 0] = torch.where(rot, sin, m[:, 1, 0])
    m[:, 1, 1] = torch.where(rot, cos, m[:, 1, 1])
    shear_x, shear_y = name_of["ShearX"], name_of["ShearY"]
    m[:, 0, 1] = torch.where(shear_x, magnitude, m[:, 0, 1])
    m[:, 0, 2] = torch.where(shear_x, magnitude * (height / 2), m[:, 0, 2])
    m[:, 1, 0] = torch.where(shear_y, magnitude, m[:, 1, 0])
    m[:, 1, 2] = torch.where(shear_y, magnitude * (width / 2), m[:, 1, 2])
    m[:, 0, 2] = torch.where(name_of["TranslateX"], magnitude * width, m[:, 0, 2])
    m[:, 1, 2] = torch.where(name_of["TranslateY"], magnitude * height, m[:, 1, 2])
    return m


def affine_nearest(images: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour warp by inverse maps [N, 2, 3], fill 0: one grid_sample.

    The grid is built as in torchvision's `_affine_grid` (pixel centres, align_corners
    False), but elementwise instead of bmm so it cannot depend on the batch size.
    """
    n, _, h, w = images.shape
    theta = matrices.to(torch.float32)
    theta = theta / torch.tensor([[0.5 * w], [0.5 * h]], device=images.device)
    xs = torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, w, device=images.device).view(1, 1, w)
    ys = torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, h, device=images.device).view(1, h, 1)
    t = theta.view(n, 6, 1, 1)
    gx = xs * t[:, 0] + ys * t[:, 1] + t[:, 2]
    gy = xs * t[:, 3] + ys * t[:, 4] + t[:, 5]
    grid = torch.stack((gx, gy), dim=-1)
    out = F.grid_sample(images.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out.to(torch.uint8)


def pad_crop_flip(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor,
                  pad: int) -> torch.Tensor:
    """Crop HxW at (top, left) of the zero-padded image, then mirror where flip: one gather."""
    n, c, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    pw = w + 2 * pad
    cols = torch.arange(w, device=images.device)
    cols = torch.where(flip[:, None], w - 1 - cols, cols) + left[:, None]
    rows = torch.arange(h, device=images.device) + top[:, None]
    index = (rows[:, :, None] * pw + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    return padded.view(n, c, -1).gather(2, index).view(n, c, h, w)


def _resample_weights(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int) -> torch.Tensor:
    """Fixed-point antialiased bilinear weights [N, out, in] for the crop [start, start+length).

    PIL's / torch's antialias filter: triangle of radius max(scale, 1) in input pixels
    around output centre (o + 0.5) * scale, normalised, quantised to 2**-22.
    """
    scale = (length.to(torch.float64) / out_size)[:, None, None]
    support = scale.clamp(min=1.0)
    centre = (torch.arange(out_size, device=start.device, dtype=torch.float64)[None, :, None] + 0.5) * scale
    pos = (torch.arange(in_size, device=start.device)[None, :] - start[:, None]).to(torch.float64)[:, None, :]
    weight = (1.0 - (pos + 0.5 - centre).abs() / support).clamp_(min=0.0)
    weight = weight * ((pos >= 0) & (pos < length.to(torch.float64)[:, None, None]))
    weight = weight / weight.sum(dim=2, keepdim=True)
    return (weight * 2**_PRECISION_BITS + 0.5).floor_()


def _resample_pass(weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """One separable pass, rounded to 0..255 like PIL.

    Operands are integers, so the float64 matmul is exact in any summation order.
    """
    acc = torch.matmul(weights, x)
    return ((acc + 2 ** (_PRECISION_BITS - 1)) / 2**_PRECISION_BITS).floor_().clamp_(0, 255)


def resized_crop(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, height: torch.Tensor,
                 width: torch.Tensor, flip: torch.Tensor, size: int) -> torch.Tensor:
    """Crop each sample's box and resize it to size x size (antialiased bilinear), mirror where flip.

    Horizontal pass, round to uint8, vertical pass: PIL's order and fixed-point rounding.
    """
    _, _, h, w = images.shape
    wx = _resample_weights(left, width, w, size)
    wx = torch.where(flip[:, None, None], wx.flip(1), wx)
    wy = _resample_weights(top, height, h, size)
    x = images.to(torch.float64)
    x = _resample_pass(wx[:, None], x.transpose(2, 3)).transpose(2, 3)
    x = _resample_pass(wy[:, None], x)
    return x.to(torch.uint8)


def cutout(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, side: torch.Tensor,
           fill: tuple[int, int, int]) -> torch.Tensor:
    """Fill the square [top, top+side) x [left, left+side), clipped to the image."""
    _, _, h, w = images.shape
    ys = torch.arange(h, device=images.device)
    xs = torch.arange(w, device=images.device)
    in_rows = (ys >= top[:, None]) & (ys < (top + side)[:, None])
    in_cols = (xs >= left[:, None]) & (xs < (left + side)[:, None])
    box = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]
    colour = torch.tensor(fill, dtype=torch.uint8, device=images.device).view(1, 3, 1, 1)
    return torch.where(box, colour, images)
