"""View policy throughput against a resnet8x4 training step on the same batch and device.

Usage: python benchmarks/bench_views.py [--batch 256] [--repeats 10] [--threads N]
Prints img/s per policy and its time as a fraction of one resnet8x4 forward + backward
+ SGD step (CIFAR-100 head) at the same batch size; target for `strong`: <= 10%.
imagenet_* policies read 64x64 inputs (data stored at twice the output size).
Median over repeats, each with other seeds (another round), after one warm-up call.
"""

import argparse
import statistics
import time

import torch

from kdcache.augment import get_policy, list_policies, normalize, view_seeds
from kdcache.models import create_model


def median_seconds(fn, device: torch.device, repeats: int) -> float:
    fn(0)
    times = []
    for r in range(1, repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(r)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_seconds(device: torch.device, batch: int, repeats: int) -> float:
    model = create_model("resnet8x4", 100).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    images = torch.randn(batch, 3, 32, 32, device=device)
    labels = torch.randint(0, 100, (batch,), device=device)

    def step(_):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()

    return median_seconds(step, device, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    gen = torch.Generator().manual_seed(0)
    for device in devices:
        step = step_seconds(device, args.batch, args.repeats)
        threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
        print(f"{device.type}{threads}: resnet8x4 fwd+bwd+SGD step, batch {args.batch}: "
              f"{step * 1e3:.1f} ms ({args.batch / step:.0f} img/s)")
        indices = torch.arange(args.batch, device=device)
        for name in list_policies():
            size = 64 if name.startswith("imagenet") else 32
            images = torch.randint(0, 256, (args.batch, 3, size, size), generator=gen, dtype=torch.uint8).to(device)
            policy = get_policy(name, 32)

            def view(r):
                return normalize(policy(images, view_seeds(0, r, 0, indices)), (0.5,) * 3, (0.25,) * 3)

            seconds = median_seconds(view, device, args.repeats)
            print(f"  {name:16s} {size}->32  {seconds * 1e3:8.2f} ms  {args.batch / seconds:10.0f} img/s  "
                  f"{100 * seconds / step:6.2f}% of the step")


if __name__ == "__main__":
    main()
