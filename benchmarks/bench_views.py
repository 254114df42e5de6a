"""View policy throughput, host syncs and graph size, on the CPU and (when present) CUDA.

Usage: python benchmarks/bench_views.py [--batch 256] [--repeats 5] [--threads N] [--no-compile]

A view here is what the replayer computes: normalize(policy(images, seeds)), with the
seeds made outside the timed call. imagenet_* policies read 64x64 inputs.
CPU: img/s of each policy on the sparse CPU path and on the dense device path (forced),
and as a percentage of one resnet8x4 forward + backward + SGD step at the same batch;
ATen ops and host syncs per batch on the device path (kdcache.augment.census.OpCensus);
the graphs, graph breaks and ATen ops of torch.compile on the device path (dynamo explain).
CUDA: img/s eager vs torch.compile (inductor) at batch 64 and 512.
Median over repeats, each with other seeds (another round), after one warm-up call.
"""

import argparse
import statistics
import time

import torch

from kdcache.augment import get_policy, list_policies, normalize, view_seeds
from kdcache.augment.census import OpCensus
from kdcache.models import create_model

MEAN, STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)


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


def view_fn(name: str, dense: bool):
    policy = get_policy(name, 32)

    def views(images, seeds):
        return normalize(policy(images, seeds, dense=dense), MEAN, STD)

    return views


def inputs(name: str, batch: int, device: torch.device):
    size = 64 if name.startswith("imagenet") else 32
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, size, size), generator=gen, dtype=torch.uint8).to(device)
    return images, torch.arange(batch, device=device)


def timed(views, images, indices, device, repeats) -> float:
    seeds = [view_seeds(0, r, 1, indices) for r in range(repeats + 1)]
    return median_seconds(lambda r: views(images, seeds[r]), device, repeats)


def cpu_report(args) -> None:
    device = torch.device("cpu")
    step = step_seconds(device, args.batch, args.repeats)
    print(f"cpu, {torch.get_num_threads()} threads, batch {args.batch}: resnet8x4 fwd+bwd+SGD step "
          f"{step * 1e3:.1f} ms")
    print(f"  {'policy':16s} {'in':>3s} {'sparse img/s':>12s} {'% step':>7s} {'dense img/s':>12s} {'% step':>7s} "
          f"{'ops/batch':>9s} {'syncs':>5s} {'graphs':>6s} {'breaks':>6s} {'graph ops':>9s}")
    for name in list_policies():
        images, indices = inputs(name, args.batch, device)
        sparse = timed(view_fn(name, False), images, indices, device, args.repeats)
        dense_views = view_fn(name, True)
        dense = timed(dense_views, images, indices, device, args.repeats)
        with OpCensus() as census:
            dense_views(images, view_seeds(0, 0, 1, indices))
        graphs = breaks = graph_ops = "-"
        if not args.no_compile:
            torch._dynamo.reset()
            explained = torch._dynamo.explain(dense_views)(images, view_seeds(0, 0, 1, indices))
            graphs, breaks = explained.graph_count, explained.graph_break_count
            graph_ops = sum(len(ops) for ops in explained.ops_per_graph)
        print(f"  {name:16s} {images.shape[-1]:3d} {args.batch / sparse:12.0f} {100 * sparse / step:7.2f} "
              f"{args.batch / dense:12.0f} {100 * dense / step:7.2f} {census.op_count:9d} {census.sync_count:5d} "
              f"{graphs:>6} {breaks:>6} {graph_ops:>9}")


def cuda_report(args) -> None:
    device = torch.device("cuda")
    print(f"\ncuda ({torch.cuda.get_device_name()}): img/s, eager vs torch.compile (inductor)")
    print(f"  {'policy':16s} {'batch':>5s} {'eager':>10s} {'compiled':>10s}")
    for name in list_policies():
        for batch in (64, 512):
            images, indices = inputs(name, batch, device)
            views = view_fn(name, True)
            eager = timed(views, images, indices, device, args.repeats)
            compiled = "-"
            if not args.no_compile:
                torch._dynamo.reset()
                seconds = timed(torch.compile(views, dynamic=False), images, indices, device, args.repeats)
                compiled = f"{batch / seconds:10.0f}"
            print(f"  {name:16s} {batch:5d} {batch / eager:10.0f} {compiled:>10s}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (dynamo explain, inductor)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu_report(args)
    if torch.cuda.is_available():
        cuda_report(args)


if __name__ == "__main__":
    main()
