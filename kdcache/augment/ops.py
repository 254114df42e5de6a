"""Batched image ops on uint8 [N, 3, H, W] with one parameter per sample, equal to PIL's.

Each op reproduces the arithmetic of the PIL function CRLD's RandAugment calls (integer
and float32/float64 steps in PIL's order), so it gives PIL's output for the same
magnitude; the tests compare every op with Pillow. A sample's result depends only on
its own pixels and parameters (elementwise ops, gathers, per-sample reductions and
integer histograms), never on the rest of the batch, and no op reads a value back to
the host or has a data-dependent shape.
"""

import torch
import torch.nn.functional as F

# RandAugment op pool and magnitude ranges (low, high), in the order of CRLD's
# `augment_list` (part of the policy format). A magnitude is low + u * (high - low).
OP_RANGES = {
    "AutoContrast": (0.0, 1.0), "Brightness": (0.05, 0.95), "Color": (0.05, 0.95),
    "Contrast": (0.05, 0.95), "Equalize": (0.0, 1.0), "Identity": (0.0, 1.0), "Posterize": (4.0, 8.0),
    "Rotate": (-30.0, 30.0), "Sharpness": (0.05, 0.95), "ShearX": (-0.3, 0.3), "ShearY": (-0.3, 0.3),
    "Solarize": (0.0, 256.0), "TranslateX": (-0.3, 0.3), "TranslateY": (-0.3, 0.3),
}
OPS = tuple(OP_RANGES)
GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")

# Fixed-point precision of the resampling weights (PIL's PRECISION_BITS).
_PRECISION_BITS = 22


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    """[N] parameters as [N, 1, 1, 1], broadcasting over an image batch."""
    return values.view(-1, 1, 1, 1)


def _blend(degenerate: torch.Tensor | int, images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's Image.blend(degenerate, image, factor) for 0 <= factor <= 1 (ImageEnhance).

    PIL computes (uint8)(d + alpha * (x - d)) in float32 with alpha = (float)factor.
    The product of a float32 and a 9-bit integer is exact in float64, so rounding it to
    float32 is float32's multiplication, and no compiler can fuse it with the add.
    """
    alpha = _per_sample(factor.to(torch.float32).to(torch.float64))
    product = (alpha * (images.to(torch.int32) - degenerate)).to(torch.float32)
    return (degenerate + product).clamp_(0, 255).to(torch.uint8)


def _grayscale(images: torch.Tensor) -> torch.Tensor:
    """PIL's convert("L"): (19595 R + 38470 G + 7471 B + 2**15) >> 16, int32 [N, 1, H, W]."""
    r, g, b = images.to(torch.int32).unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).unsqueeze(1)


def brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(0, images, factor)


def color(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(_grayscale(images), images, factor)


def contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the grey image's mean rounded half up (PIL: int(mean + 0.5)), in integers."""
    grey = _grayscale(images).to(torch.int64)
    count = grey.shape[-2] * grey.shape[-1]
    total = grey.sum(dim=(1, 2, 3), keepdim=True)
    mean = (2 * total + count) // (2 * count)
    return _blend(mean.to(torch.int32), images, factor)


def sharpness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with PIL's SMOOTH filter (3x3, centre 5, others 1, /13, rounded); border kept.

    PIL sums in float32 and rounds; an integer sum / 13 is never within float32 error
    of a half, so the exact integer rounding (sum + 6) // 13 is the same.
    """
    x = images.to(torch.int32)
    h, w = x.shape[-2:]
    if h <= 2 or w <= 2:
        return images.clone()
    total = 4 * x[:, :, 1:-1, 1:-1]
    for dy in range(3):
        for dx in range(3):
            total = total + x[:, :, dy:dy + h - 2, dx:dx + w - 2]
    smooth = x.clone()
    smooth[:, :, 1:-1, 1:-1] = (total + 6) // 13
    return _blend(smooth, images, factor)


def posterize(images: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """PIL's ImageOps.posterize(int(magnitude)): keep the top bits of each value.

    Clamped to 0..8 bits so that rows holding another op's magnitude stay valid.
    """
    dropped = 8 - magnitude.floor().clamp(0, 8).to(torch.int64)
    keep = ((255 >> dropped) << dropped).to(torch.uint8)
    return images & _per_sample(keep)


def solarize(images: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """PIL's ImageOps.solarize: invert values >= threshold (256: unchanged)."""
    return torch.where(images >= _per_sample(threshold), 255 - images, images)


def autocontrast(images: torch.Tensor) -> torch.Tensor:
    """PIL's ImageOps.autocontrast per channel: int(v * scale + offset) in float64 with
    scale = 255 / (hi - lo), offset = -lo * scale, clipped; constant channels unchanged."""
    lo = images.amin(dim=(2, 3), keepdim=True).to(torch.float64)
    hi = images.amax(dim=(2, 3), keepdim=True).to(torch.float64)
    flat = hi <= lo
    span = torch.where(flat, 1.0, hi - lo)
    scale = torch.full_like(span, 255.0) / span  # `255.0 / span` would multiply by a reciprocal
    offset = -lo * scale
    out = (images.to(torch.float64) * scale + offset).clamp_(0, 255).to(torch.uint8)
    return torch.where(flat, images, out)


def equalize(images: torch.Tensor) -> torch.Tensor:
    """PIL's ImageOps.equalize per channel, from per-sample histograms (scatter_add_)."""
    n, c, h, w = images.shape
    flat = images.reshape(n * c, h * w).to(torch.int64)
    hist = torch.zeros(n * c, 256, dtype=torch.int64, device=images.device)
    hist.scatter_add_(1, flat, torch.ones_like(flat))
    # PIL: step = (pixels - count of the last non-empty bin) // 255.
    last = 255 - (hist.flip(1) > 0).to(torch.int64).argmax(dim=1, keepdim=True)
    step = (h * w - hist.gather(1, last)) // 255
    # lut[i] = (step // 2 + pixels below value i) // step, clipped to 255.
    below = hist.cumsum(1) - hist
    levels = torch.arange(256, device=images.device)
    lut = torch.where(step > 0, ((below + step // 2) // step.clamp(min=1)).clamp_(max=255), levels)
    return lut.gather(1, flat).to(torch.uint8).view(n, c, h, w)


def affine_coefficients(op_index: torch.Tensor, magnitude: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """PIL's AFFINE data (a, b, c, d, e, f), float64 [N, 6]: output pixel (x, y) reads the
    input at (a x + b y + c, d x + e y + f), as CRLD's ops call PIL; identity for other ops.

    Rotate is Image.rotate(v): counter-clockwise about (W/2, H/2), with PIL's
    angle = -radians(v % 360) (PIL also rounds cos/sin to 15 decimals; we do not, which
    changes a 16.16 fixed-point coefficient only when it lies within 1e-15 of a rounding
    boundary). ShearX (1, v, 0, 0, 1, 0), ShearY (1, 0, 0, v, 1, 0), TranslateX
    (1, 0, v W, 0, 1, 0), TranslateY (1, 0, 0, 0, 1, v H).
    """
    def is_op(name):
        return op_index == OPS.index(name)

    zero, one = torch.zeros_like(magnitude), torch.ones_like(magnitude)
    angle = -torch.deg2rad(torch.remainder(magnitude, 360.0))
    cos, sin = torch.cos(angle), torch.sin(angle)
    cx, cy = width / 2, height / 2
    rot = is_op("Rotate")
    a = torch.where(rot, cos, one)
    b = torch.where(rot, sin, torch.where(is_op("ShearX"), magnitude, zero))
    d = torch.where(rot, -sin, torch.where(is_op("ShearY"), magnitude, zero))
    e = torch.where(rot, cos, one)
    c = torch.where(rot, cos * -cx + sin * -cy + cx, torch.where(is_op("TranslateX"), magnitude * width, zero))
    f = torch.where(rot, -sin * -cx + cos * -cy + cy, torch.where(is_op("TranslateY"), magnitude * height, zero))
    return torch.stack([a, b, c, d, e, f], dim=1)


def affine_nearest(images: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """PIL's Image.transform(AFFINE, NEAREST), fill 0, as one gather.

    PIL takes one of two paths: when b = d = 0 (translation) ImagingScaleAffine,
    input x = floor(c + a / 2 + a x) in float64; otherwise affine_fixed, 16.16 fixed
    point: input x = (FIX(c + a/2 + b/2) + x FIX(a) + y FIX(b)) >> 16 with
    FIX(v) = floor(v * 65536 + 0.5) (y likewise). Both are reproduced exactly, in
    int64 for the fixed-point path (PIL accumulates the same sums in int).
    """
    n, ch, h, w = images.shape
    a, b, c, d, e, f = (col.view(n, 1, 1) for col in coefficients.unbind(1))
    xs = torch.arange(w, device=images.device).view(1, 1, w)
    ys = torch.arange(h, device=images.device).view(1, h, 1)

    def fix(v):
        return torch.floor(v * 65536.0 + 0.5).to(torch.int64)

    x_fixed = (fix(c + a * 0.5 + b * 0.5) + xs * fix(a) + ys * fix(b)) >> 16
    y_fixed = (fix(f + d * 0.5 + e * 0.5) + xs * fix(d) + ys * fix(e)) >> 16
    x_scaled = torch.floor((c + a * 0.5) + xs * a).to(torch.int64)
    y_scaled = torch.floor((f + e * 0.5) + ys * e).to(torch.int64)
    scaling = (b == 0) & (d == 0)
    x_in = torch.where(scaling, x_scaled, x_fixed)
    y_in = torch.where(scaling, y_scaled, y_fixed)
    inside = (x_in >= 0) & (x_in < w) & (y_in >= 0) & (y_in < h)
    index = torch.where(inside, y_in * w + x_in, 0).view(n, 1, h * w).expand(n, ch, h * w)
    out = images.reshape(n, ch, h * w).gather(2, index).view(n, ch, h, w)
    return torch.where(inside[:, None], out, 0)


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


def cutout(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, height: torch.Tensor,
           width: torch.Tensor, fill: tuple[int, int, int]) -> torch.Tensor:
    """Fill the box [top, top+height) x [left, left+width), clipped to the image."""
    _, _, h, w = images.shape
    ys = torch.arange(h, device=images.device)
    xs = torch.arange(w, device=images.device)
    in_rows = (ys >= top[:, None]) & (ys < (top + height)[:, None])
    in_cols = (xs >= left[:, None]) & (xs < (left + width)[:, None])
    box = in_rows[:, :, None] & in_cols[:, None, :]
    return torch.stack([torch.where(box, value, images[:, i]) for i, value in enumerate(fill)], dim=1)
