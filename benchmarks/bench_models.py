"""Throughput of the usual CIFAR distillation pair: resnet32x4 (teacher) and resnet8x4 (student).

Training rows time forward + backward + SGD step at batch 64 (what stage 2 pays per
student step); the inference row times resnet32x4 in eval mode under no_grad at batch 256
(what stage 1 pays per teacher batch). Runs on the CPU, and on CUDA when available.

    python benchmarks/bench_models.py [--channels-last] [--seconds 3] [--devices cpu,cuda]

--channels-last adds rows with model and input in channels_last memory format.
"""

import argparse
import os
import platform
import time

import torch
import torch.nn.functional as F

from kdcache.models import create_model

# (model, mode, batch size)
CASES = [("resnet8x4", "train", 64), ("resnet32x4", "train", 64), ("resnet32x4", "infer", 256)]
NUM_CLASSES = 100


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    cpu = names[0] if names else platform.processor()
    return f"{cpu}, {torch.get_num_threads()} torch threads"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def throughput(name: str, mode: str, batch: int, device: str, channels_last: bool, seconds: float) -> float:
    """Images per second over repeated steps, after two warm-up steps (kernel selection,
    allocator growth)."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = create_model(name, NUM_CLASSES).to(device=device, memory_format=memory_format)
    images = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=memory_format)
    labels = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    if mode == "train":
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(images), labels).backward()
            optimizer.step()
    else:
        model.eval()

        def step() -> None:
            with torch.no_grad():
                model(images)

    for _ in range(2):
        step()
    sync(device)
    steps, start = 0, time.perf_counter()
    while steps < 3 or time.perf_counter() - start < seconds:
        step()
        steps += 1
        if steps % 10 == 0:  # keep the CUDA queue short so the clock check means something
            sync(device)
    sync(device)
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels-last", action="store_true", help="also measure channels_last")
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum timed seconds per row")
    default_devices = "cpu,cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--devices", default=default_devices, help="comma-separated: cpu, cuda")
    args = parser.parse_args()

    formats = [False, True] if args.channels_last else [False]
    print(f"torch {torch.__version__}; load average {os.getloadavg()[0]:.1f} (other processes skew CPU rows)")
    print(f"{'device':6} {'model':11} {'mode':6} {'batch':>5} {'format':14} {'img/s':>9}")
    for device in args.devices.split(","):
        print(f"# {device}: {device_name(device)}")
        for name, mode, batch in CASES:
            for channels_last in formats:
                rate = throughput(name, mode, batch, device, channels_last, args.seconds)
                fmt = "channels_last" if channels_last else "contiguous"
                print(f"{device:6} {name:11} {mode:6} {batch:5d} {fmt:14} {rate:9.1f}", flush=True)


if __name__ == "__main__":
    main()
