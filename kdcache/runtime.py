"""What both stages run on: the device, the torchrun process group, precision, model
placement and evaluation. Stage 1 (precompute) and stage 2 (engine) import this module;
neither imports the other.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from kdcache.data import DatasetMeta, make_loader
from kdcache.errors import KdcacheError
from kdcache.replay import eval_replayer, eval_views, view_size


@dataclass
class DistContext:
    """Rank and world size under torchrun (WORLD_SIZE > 1), else a single process."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def init_distributed(device: torch.device) -> DistContext:
    """Join the torchrun process group if there is one (gloo on CPU, nccl on CUDA)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        # Left to interpreter teardown, gloo's worker threads can abort the process (SIGABRT,
        # "terminate called without an active exception": pytorch/pytorch#190489); seen once
        # in four suite runs of the two-process test on a loaded 2-core machine.
        atexit.register(_destroy_process_group)
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size())


def _destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def pick_device(name: str | None) -> torch.device:
    """`cuda` when available unless told otherwise; the local rank's GPU under torchrun."""
    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index not in (None, 0)):
        raise KdcacheError(f"--device {name!r} is not a device kdcache trains on; use cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise KdcacheError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if device.index >= torch.cuda.device_count():
            raise KdcacheError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                               f"numbered 0..{torch.cuda.device_count() - 1}")
        torch.cuda.set_device(device)
    return device


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (for timings; the training step never calls it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CUDA when asked; fp32 everywhere else."""
    if precision == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    """The model on `device`, channels_last on CUDA (faster convolutions, with `to_model_input`)."""
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def to_model_input(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x


@torch.no_grad()
def evaluate(model: nn.Module, data_dir: Path, meta: DatasetMeta, device: torch.device, batch_size: int = 256,
             precision: str = "fp32", progress: bool = False, image_size: int | None = None) -> dict[str, float]:
    """Top-1, top-5 and CE loss of `model` on the un-augmented, normalised test split.

    Images of their own sizes are evaluated on `eval_replayer`'s centre crop at `image_size`
    (default `view_size(meta)`), cut at decode time. Sums stay on the device and are read
    once at the end (no host sync per batch)."""
    was_training = model.training
    model.eval()
    replayer = eval_replayer(view_size(meta, image_size), meta.mean, meta.std) if meta.own_size else None
    loader = make_loader(data_dir, "test", batch_size, shuffle=False, device=device, replayer=replayer)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, top-1 hits, top-5 hits
    start = time.perf_counter()
    for images, labels, indices in tqdm(loader, desc="eval", unit="batch", leave=False, disable=not progress,
                                        dynamic_ncols=True):
        x = eval_views(images, meta.mean, meta.std)
        with autocast(device, precision):
            logits = model(to_model_input(x)).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        sums += torch.stack([F.cross_entropy(logits, labels, reduction="sum"), (top[:, 0] == labels).sum(),
                             (top == labels[:, None]).any(dim=1).sum()]).double()
    loss_sum, correct1, correct5 = sums.tolist()
    elapsed = time.perf_counter() - start
    model.train(was_training)
    seen = meta.counts["test"]
    return {"top1": 100.0 * correct1 / seen, "top5": 100.0 * correct5 / seen, "loss": loss_sum / seen,
            "images_per_s": seen / elapsed}
