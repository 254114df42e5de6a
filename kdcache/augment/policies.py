"""View policies: seeds -> explicit per-sample parameters -> uint8 views.

A policy is a fixed sequence of steps. Each step owns a fixed number of uniform streams
of the sample's seed, in order, and turns them into its parameters; how streams map to
parameters is part of the store format (docs/views.md, POLICY_FORMAT_VERSION).
"""

import math

import torch

from kdcache.augment import ops
from kdcache.augment.seeds import SEED_FORMAT_VERSION, uniform_streams
from kdcache.errors import KdcacheError

POLICY_FORMAT_VERSION = 2

CUTOUT_FILL = (125, 123, 114)


def _floor_index(u: torch.Tensor, count) -> torch.Tensor:
    """Uniform integer in [0, count) from u in [0, 1) (count an int or int tensor)."""
    return torch.floor(u * count).to(torch.int64)


class PadCropFlip:
    """Random crop of the zero-padded image at its own size, then horizontal flip p=0.5."""

    streams = 3

    def __init__(self, size: int, pad: int):
        self.size, self.pad = size, pad

    def sample(self, u, input_size):
        return {"crop_top": _floor_index(u[:, 0], 2 * self.pad + 1),
                "crop_left": _floor_index(u[:, 1], 2 * self.pad + 1),
                "flip": u[:, 2] < 0.5}

    def apply(self, images, p, dense):
        if images.shape[-2:] != (self.size, self.size):
            raise KdcacheError(
                f"images are {tuple(images.shape[-2:])} but this policy crops {self.size}x{self.size} "
                "from images of that size; use image_size equal to the data's size or an imagenet_* policy")
        return ops.pad_crop_flip(images, p["crop_top"], p["crop_left"], p["flip"], self.pad)


class ResizedCropFlip:
    """torchvision's RandomResizedCrop (10 tries, then the centre-crop fallback) + flip p=0.5."""

    tries = 10
    streams = 4 * tries + 1

    def __init__(self, size: int, scale: tuple[float, float], ratio: tuple[float, float]):
        self.size, self.scale, self.ratio = size, scale, ratio

    def sample(self, u, input_size):
        """input_size: (H, W) ints, or int64 [B] tensors (each image its own size), or None
        when the box was cut at decode time (only the flip is left to draw)."""
        flip = u[:, 4 * self.tries] < 0.5
        if input_size is None:
            return {"flip": flip}
        height, width = input_size
        per_sample = isinstance(height, torch.Tensor)
        fallback = self._fallback(height, width)
        if per_sample:  # broadcast each image's size over its tries
            height, width = height[:, None], width[:, None]
        area = height * width
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        tries = u[:, : 4 * self.tries].view(-1, self.tries, 4)
        target_area = area * (self.scale[0] + tries[..., 0] * (self.scale[1] - self.scale[0]))
        aspect = torch.exp(log_lo + tries[..., 1] * (log_hi - log_lo))
        w = torch.round(torch.sqrt(target_area * aspect)).to(torch.int64)
        h = torch.round(torch.sqrt(target_area / aspect)).to(torch.int64)
        top = _floor_index(tries[..., 2], height - h + 1)
        left = _floor_index(tries[..., 3], width - w + 1)
        ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        # The first try that fits, else torchvision's centre-crop fallback.
        first = ok.to(torch.int64).argmax(dim=1)[:, None, None].expand(-1, 1, 4)
        boxes = torch.stack([top, left, h, w], dim=2).gather(1, first).squeeze(1)
        fits = ok.any(dim=1)
        top, left, h, w = (torch.where(fits, boxes[:, i], value) for i, value in enumerate(fallback))
        return {"crop_top": top, "crop_left": left, "crop_height": h, "crop_width": w, "flip": flip}

    def _fallback(self, height, width):
        """torchvision's centre crop when no try fits (per image when the sizes are tensors,
        in the same float64 arithmetic as Python's)."""
        lo, hi = min(self.ratio), max(self.ratio)
        if isinstance(height, torch.Tensor):
            in_ratio = width.double() / height
            w = torch.where(in_ratio > hi, torch.round(height.double() * hi).to(torch.int64), width)
            h = torch.where(in_ratio < lo, torch.round(width.double() / lo).to(torch.int64), height)
            return (height - h) // 2, (width - w) // 2, h, w
        in_ratio = width / height
        if in_ratio < lo:
            w, h = width, int(round(width / lo))
        elif in_ratio > hi:
            w, h = int(round(height * hi)), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def box(self, u, heights, widths):
        p = self.sample(u, (heights, widths))
        return torch.stack([p["crop_top"], p["crop_left"], p["crop_height"], p["crop_width"]], dim=1)

    def finish(self, crops, p):
        """What is left once the box was cut and resized at decode time: the flip."""
        return torch.where(p["flip"].view(-1, 1, 1, 1), crops.flip(3), crops)

    def apply(self, images, p, dense):
        return ops.resized_crop(images, p["crop_top"], p["crop_left"], p["crop_height"], p["crop_width"],
                                p["flip"], self.size)


class CenterResize:
    """Evaluation view: the centred square of side crop_fraction * min(H, W), resized."""

    streams = 0

    def __init__(self, size: int, crop_fraction: float):
        self.size, self.crop_fraction = size, crop_fraction

    def sample(self, u, input_size):
        return {}

    def box(self, u, heights, widths):
        side = torch.round(torch.minimum(heights, widths).double() * self.crop_fraction).to(torch.int64).clamp(min=1)
        return torch.stack([(heights - side) // 2, (widths - side) // 2, side, side], dim=1)

    def finish(self, crops, p):
        return crops

    def apply(self, images, p, dense):
        n, _, h, w = images.shape
        if (h, w) == (self.size, self.size) and self.crop_fraction == 1.0:
            return images
        side = max(1, round(min(h, w) * self.crop_fraction))
        top, left, length = (torch.full((n,), value, device=images.device)
                             for value in ((h - side) // 2, (w - side) // 2, side))
        return ops.resized_crop(images, top, left, length, length,
                                torch.zeros(n, dtype=torch.bool, device=images.device), self.size)


def _apply_rows(selected, fn, x, out, dense, *params):
    """`out` with the rows in `selected` replaced by `fn(x, *params)` on those rows.

    dense (the device path): fn runs on every row and torch.where picks, so shapes do
    not depend on the data and nothing syncs. Sparse (the CPU path): fn runs on the
    selected rows only, found with nonzero. fn is per-sample, so both give the same bits.
    """
    if dense:
        return torch.where(selected.view(-1, 1, 1, 1), fn(x, *params), out)
    rows = selected.nonzero().squeeze(1)
    if rows.numel():
        out[rows] = fn(x[rows], *(p[rows] for p in params))
    return out


_COLOUR_OPS = {
    "AutoContrast": lambda x, m: ops.autocontrast(x), "Brightness": ops.brightness, "Color": ops.color,
    "Contrast": ops.contrast, "Equalize": lambda x, m: ops.equalize(x), "Posterize": ops.posterize,
    "Sharpness": ops.sharpness, "Solarize": ops.solarize,
}


class RandAugment:
    """CRLD's RandAugment(n, 10): n ops drawn uniformly with replacement from ops.OPS, each
    always applied, magnitude low + u (high - low) (Posterize uses int(magnitude) bits)."""

    def __init__(self, num_ops: int):
        self.num_ops = num_ops
        self.streams = 2 * num_ops

    def sample(self, u, input_size):
        op = _floor_index(u[:, 0::2], len(ops.OPS))
        low, span = torch.zeros_like(u[:, 1::2]), torch.zeros_like(u[:, 1::2])
        for i, (lo, hi) in enumerate(ops.OP_RANGES.values()):
            low = torch.where(op == i, lo, low)
            span = torch.where(op == i, hi - lo, span)
        return {"ra_op": op, "ra_magnitude": low + span * u[:, 1::2]}

    def apply(self, images, p, dense):
        h, w = images.shape[-2:]

        def geometric(x, magnitude, op):
            return ops.affine_nearest(x, ops.affine_coefficients(op, magnitude, h, w))

        # Each row gets one op per position, so in the sparse path the ops can update `out`
        # in place while reading it: no op reads rows another op has written.
        out = images if dense else images.clone()
        for j in range(self.num_ops):
            op, mag = p["ra_op"][:, j], p["ra_magnitude"][:, j]
            x = out
            is_geometric = torch.zeros_like(op, dtype=torch.bool)
            for name in ops.GEOMETRIC:
                is_geometric = is_geometric | (op == ops.OPS.index(name))
            out = _apply_rows(is_geometric, geometric, x, out, dense, mag, op)
            for name, fn in _COLOUR_OPS.items():
                out = _apply_rows(op == ops.OPS.index(name), fn, x, out, dense, mag)
        return out


class Cutout:
    """CRLD's Cutout: side v = u * max_fraction * size (no box when v = 0), centre
    uniform in (1, size] (numpy's uniform(size) draws from (1, size]), box corners
    (int(max(0, c - v/2)), int(min(size, that + v))) drawn end-inclusive by PIL, so
    a box at the top/left edge is pushed inside at full size, one at the far edge clipped."""

    streams = 3

    def __init__(self, size: int, max_fraction: float):
        self.size, self.max_fraction = size, max_fraction

    def sample(self, u, input_size):
        v = u[:, 0] * self.max_fraction * self.size
        box = {}
        for axis, centre_u in (("left", u[:, 1]), ("top", u[:, 2])):
            centre = self.size + (1.0 - self.size) * centre_u
            start = (centre - v / 2).clamp(min=0).floor()
            end = (start + v).clamp(max=self.size).floor()
            box[f"cutout_{axis}"] = start.to(torch.int64)
            box[f"cutout_{'width' if axis == 'left' else 'height'}"] = torch.where(
                v > 0, end - start + 1, 0).to(torch.int64)
        return box

    def apply(self, images, p, dense):
        return ops.cutout(images, p["cutout_top"], p["cutout_left"], p["cutout_height"], p["cutout_width"],
                          CUTOUT_FILL)


class ViewPolicy:
    """Turns (uint8 images, seeds) into views; parameters depend on the seed alone."""

    def __init__(self, name: str, image_size: int, params: dict, steps: list):
        self.name, self.image_size, self.params, self.steps = name, image_size, params, steps

    def sample(self, seeds: torch.Tensor, input_size: tuple[int, int] | None) -> dict[str, torch.Tensor]:
        """Per-sample parameters of the views with these seeds, for inputs of input_size (H, W);
        None when the crop box was cut at decode time (then no box is drawn)."""
        u = uniform_streams(seeds, sum(step.streams for step in self.steps))
        params, start = {}, 0
        for step in self.steps:
            params.update(step.sample(u[:, start:start + step.streams], input_size))
            start += step.streams
        return params

    def apply(self, images: torch.Tensor, params: dict[str, torch.Tensor], dense: bool | None = None) -> torch.Tensor:
        """dense selects the device path (fixed shapes, no host sync, one compiled graph);
        by default it is used on every device but the CPU, where the sparse path is
        faster. Both give the same bits."""
        if dense is None:
            dense = images.device.type != "cpu"
        for step in self.steps:
            images = step.apply(images, params, dense)
        return images

    def crop_boxes(self, seeds: torch.Tensor, heights: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
        """int64 [B, 4] (top, left, height, width): the box each view cuts from its image of
        size heights x widths (int64 [B]), drawn by the first step exactly as `__call__`
        draws it. Images of their own sizes have it cut at decode time (`kdcache.data.decode`)."""
        step = self.crop_step()
        return step.box(uniform_streams(seeds, step.streams), heights, widths)

    def crop_step(self):
        """The step that cuts the box, which images of their own sizes run at decode time."""
        if not hasattr(self.steps[0], "box"):
            raise KdcacheError(f"view policy {self.name!r} crops images of one size; for images of their own sizes "
                               "use imagenet_weak, imagenet_strong or identity (e.g. --views "
                               "weak=imagenet_weak,strong=imagenet_strong)")
        return self.steps[0]

    def finish(self, crops: torch.Tensor, seeds: torch.Tensor, dense: bool | None = None) -> torch.Tensor:
        """The views whose boxes `crop_boxes` gave, from those boxes already cut and resized to
        uint8 [B,3,S,S]: the rest of the first step (the flip), then every other step."""
        if dense is None:
            dense = crops.device.type != "cpu"
        params = self.sample(seeds.to(crops.device), None)
        crops = self.steps[0].finish(crops, params)
        for step in self.steps[1:]:
            crops = step.apply(crops, params, dense)
        return crops

    def __call__(self, images: torch.Tensor, seeds: torch.Tensor, dense: bool | None = None) -> torch.Tensor:
        """Views of `images` for `seeds` (see `apply` for `dense`)."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 [B, 3, H, W] images, got {images.dtype} {tuple(images.shape)}")
        if seeds.shape != images.shape[:1]:
            raise ValueError(f"expected one seed per image, got {tuple(seeds.shape)} for {images.shape[0]} images")
        return self.apply(images, self.sample(seeds.to(images.device), tuple(images.shape[-2:])), dense)

    def spec(self) -> dict:
        """JSON-serialisable identity of this policy, recorded in stores."""
        return {"name": self.name, "image_size": self.image_size, "params": dict(self.params),
                "policy_format_version": POLICY_FORMAT_VERSION, "seed_format_version": SEED_FORMAT_VERSION}

    def __repr__(self):
        return f"ViewPolicy({self.name!r}, image_size={self.image_size}, params={self.params})"


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise KdcacheError(message)


def _pair(name, value):
    _check(isinstance(value, (list, tuple)) and len(value) == 2 and 0 < value[0] <= value[1],
           f"{name} must be two numbers 0 < low <= high, got {value!r}")
    return (float(value[0]), float(value[1]))


def _rand_augment_steps(size, num_ops, cutout):
    _check(isinstance(num_ops, int) and num_ops >= 0, f"num_ops must be a non-negative integer, got {num_ops!r}")
    _check(0.0 <= cutout <= 1.0, f"cutout must be a fraction of the image size in [0, 1], got {cutout!r}")
    return [RandAugment(num_ops), Cutout(size, float(cutout))]


def _weak(size, pad):
    _check(isinstance(pad, int) and pad >= 0, f"pad must be a non-negative integer, got {pad!r}")
    return [PadCropFlip(size, pad)]


def _strong(size, pad, num_ops, cutout):
    return _weak(size, pad) + _rand_augment_steps(size, num_ops, cutout)


def _imagenet_weak(size, scale, ratio):
    return [ResizedCropFlip(size, _pair("scale", scale), _pair("ratio", ratio))]


def _imagenet_strong(size, scale, ratio, num_ops, cutout):
    return _imagenet_weak(size, scale, ratio) + _rand_augment_steps(size, num_ops, cutout)


def _identity(size, crop_fraction):
    _check(0.0 < crop_fraction <= 1.0, f"crop_fraction must be in (0, 1], got {crop_fraction!r}")
    return [CenterResize(size, float(crop_fraction))]


_IMAGENET_DEFAULTS = {"scale": [0.08, 1.0], "ratio": [3 / 4, 4 / 3]}
# name -> (step builder, default parameters as a function of the image size)
_POLICIES = {
    "weak": (_weak, lambda size: {"pad": size // 8}),
    "strong": (_strong, lambda size: {"pad": size // 8, "num_ops": 2, "cutout": 0.5}),
    "imagenet_weak": (_imagenet_weak, lambda size: dict(_IMAGENET_DEFAULTS)),
    "imagenet_strong": (_imagenet_strong, lambda size: {**_IMAGENET_DEFAULTS, "num_ops": 2, "cutout": 0.5}),
    "identity": (_identity, lambda size: {"crop_fraction": 1.0}),
}


def list_policies() -> list[str]:
    return sorted(_POLICIES)


def get_policy(name: str, image_size: int, **params) -> ViewPolicy:
    """The policy `name` producing image_size x image_size views; params override defaults."""
    if name not in _POLICIES:
        raise KdcacheError(f"unknown view policy {name!r}; choose one of {', '.join(list_policies())}")
    _check(isinstance(image_size, int) and image_size > 0, f"image_size must be a positive integer, got {image_size!r}")
    build, defaults = _POLICIES[name]
    resolved = defaults(image_size)
    unknown = sorted(set(params) - set(resolved))
    _check(not unknown,
           f"policy {name!r} has no parameter {', '.join(unknown)}; it takes {', '.join(sorted(resolved))}")
    resolved.update(params)
    steps = build(image_size, **resolved)
    # The spec must survive a JSON round trip unchanged: tuples become lists.
    resolved = {key: list(value) if isinstance(value, tuple) else value for key, value in resolved.items()}
    return ViewPolicy(name, image_size, resolved, steps)


def policy_from_spec(spec: dict) -> ViewPolicy:
    """Rebuild a policy from `ViewPolicy.spec()`, refusing specs of another format version."""
    versions = {"policy_format_version": POLICY_FORMAT_VERSION, "seed_format_version": SEED_FORMAT_VERSION}
    for key, version in versions.items():
        _check(spec.get(key) == version,
               f"view policy {spec.get('name')!r} was recorded with {key} {spec.get(key)}, this kdcache reads "
               f"{version}; regenerate the store or use the kdcache version that wrote it")
    return get_policy(spec["name"], spec["image_size"], **spec["params"])


def channel_constants(values, device) -> torch.Tensor:
    """float32 [1, C, 1, 1] filled on the device (torch.tensor would copy from the host on each call)."""
    return torch.stack([torch.full((), float(v), dtype=torch.float32, device=device) for v in values]).view(1, -1, 1, 1)


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 [B,3,H,W] -> float32 (x / 255 - mean) / std; mean, std on the 0..1 scale, as
    sequences or as `channel_constants` tensors already on the device."""
    if not isinstance(mean, torch.Tensor):
        mean, std = channel_constants(mean, images.device), channel_constants(std, images.device)
    return (images.float() / 255.0 - mean) / std
