"""`kdcache precompute`, `kdcache info`, `kdcache verify`: thin wrappers over kdcache.precompute."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from kdcache.cli.app import TrustCheckpointOpt, app, set_interrupt_hint
from kdcache.errors import KdcacheError
from kdcache.paths import default_data_dir, mdistiller_teacher_ckpt
from kdcache.precompute import PrecomputeConfig, precompute, verify
from kdcache.replay import parse_views
from kdcache.storage import LogitStore, list_encodings


@app.command("precompute")
def precompute_cmd(
    teacher: Annotated[str, typer.Option("--teacher", help="Teacher model: a zoo name (e.g. resnet32x4), timm:ARCH or package.module:factory.")],
    ckpt: Annotated[Optional[Path], typer.Option("--ckpt", help="Teacher checkpoint (default: mdistiller's download_ckpts/cifar_teachers/<teacher>_vanilla/ckpt_epoch_240.pth).")] = None,
    data: Annotated[Path, typer.Option("--data", help="Dataset dir from `kdcache data prepare`.")] = default_data_dir("cifar100"),
    views: Annotated[str, typer.Option("--views", help="View slots, comma-separated; slot=policy to choose the policy (e.g. weak=imagenet_weak).")] = "weak,strong",
    rounds: Annotated[int, typer.Option("--rounds", help="Rounds (one per student epoch; students cycle when they train longer).")] = 240,
    out: Annotated[Optional[Path], typer.Option("--out", help="Store path (default: content-addressed under $KDCACHE_HOME/stores, where distill finds it).")] = None,
    encoding: Annotated[str, typer.Option("--encoding", help=f"Logit encoding: auto (float16 below 500 classes, topk:20 from 500; see docs/store-format.md), {', '.join(list_encodings())}.")] = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Store seed: the first part of every view key.")] = 0,
    image_size: Annotated[Optional[int], typer.Option("--image-size", help="Side of the views of images of their own sizes (default 224; recorded in the store, distill reads it there). Images of one size keep theirs.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Teacher batch size (default: 256 on CPU, 1024 on CUDA).")] = None,
    precision: Annotated[str, typer.Option("--precision", help="auto (bf16 on CUDA, fp32 elsewhere), fp32 or bf16 (CUDA); logits are stored from float32 either way.")] = "auto",
    device: Annotated[Optional[str], typer.Option("--device", help="cpu, cuda or cuda:N (default: cuda when available).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing store made with other settings.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
    trust_checkpoint: TrustCheckpointOpt = False,
) -> None:
    """Run the teacher over every (round, view) of the training set and store its logits.

    Re-running the same command resumes: only incomplete or damaged slabs are computed. A
    store's declared rounds never shrink: --rounds N computes rounds 0..N-1 of it. Under
    torchrun (torchrun --nproc-per-node K -m kdcache.cli precompute ...) slabs are split across
    ranks; two precomputes on one store share its slabs (each slab has a lock).

    Example: kdcache precompute --teacher resnet32x4 --data data/cifar100 --rounds 240
    """
    set_interrupt_hint("rerun the same command to resume")
    cfg = PrecomputeConfig(teacher=teacher, ckpt=ckpt or mdistiller_teacher_ckpt(teacher), data_dir=data,
                           views=parse_views(views), rounds=rounds, out=out, encoding=encoding, seed=seed,
                           batch_size=batch_size, precision=precision, device=device, overwrite=overwrite,
                           trust_checkpoint=trust_checkpoint, image_size=image_size)
    store = precompute(cfg, progress=not quiet)
    if int(os.environ.get("RANK", "0")) == 0:
        total = store.rounds * len(store.views)
        typer.echo(f"store {store.path}: {len(store.complete_slabs())}/{total} slabs complete, "
                   f"{store.bytes_per_view_sample()} bytes per view-sample")


@app.command("info")
def info_cmd(
    store: Annotated[Path, typer.Argument(help="A logit store.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print everything as JSON.")] = False,
    check: Annotated[bool, typer.Option("--check", help="Read every complete slab to verify its checksums; exit 1 if one is damaged.")] = False,
) -> None:
    """Show a store: teacher, data, views, rounds, completeness, size and teacher accuracy per view.

    Slabs whose chunk files are missing or resized are reported as damaged; --check also
    reads every chunk to verify its checksum.

    Example: kdcache info ~/.cache/kdcache/stores/resnet32x4-0123abcd
    """
    info = LogitStore.open(store).info(deep=check)
    damaged = info["damaged_slabs"]
    if json_out:
        typer.echo(json.dumps(info, indent=2, default=str))
    else:
        _print_info(info)
    if check and damaged:
        raise KdcacheError(f"{len(damaged)} damaged slab(s) in {store}; rerun precompute on it to recompute them")


def _print_info(info: dict) -> None:
    ident = info["identity"]
    damaged = info["damaged_slabs"]
    total = info["complete_slabs"] + len(damaged) + info["incomplete_slabs"]
    typer.echo(f"store        {info['path']} (format {info['format_version']}, kdcache {info['kdcache_version']})")
    typer.echo(f"teacher      {ident['teacher']}  sha256 {ident['teacher_sha256'][:12]}  "
               f"test top-1 {info['attrs'].get('teacher_test_top1', float('nan')):.2f}%")
    typer.echo(f"data         fingerprint {ident['dataset_fingerprint'][:12]}  {info['num_samples']} samples  "
               f"{info['num_classes']} classes  {ident['image_size']}px")
    views = ", ".join(f"{slot}={spec['name']}" for slot, spec in ident["policies"].items())
    typer.echo(f"views        {views}  seed {ident['store_seed']}")
    typer.echo(f"rounds       {info['rounds']}  slabs complete {info['complete_slabs']}/{total}")
    for slab in damaged:
        typer.echo(f"damaged      round {slab['round']} view {slab['view']}: {slab['reason']} "
                   "(rerun precompute to recompute it)")
    typer.echo(f"encoding     {info['encoding']}  {info['bytes_per_view_sample']} bytes per view-sample  "
               f"{info['size_on_disk_bytes'] / 2**20:.1f} MiB on disk")
    stats = info["slab_stats"]
    for slot in info["views"]:
        rows = [s for s in stats if s["view"] == slot]
        if rows:
            acc = sum(s["teacher_top1"] for s in rows) / len(rows)
            err = max(s["max_abs_error"] for s in rows)
            kl4 = max(s["mean_kl_t4"] for s in rows)
            typer.echo(f"view {slot:<7} teacher top-1 {acc:.2f}% (mean of {len(rows)} rounds)  "
                       f"encoding error: max |dz| {err:.2e}, KL(T=4) {kl4:.2e}")


@app.command("verify")
def verify_cmd(
    store: Annotated[Path, typer.Argument(help="A logit store.")],
    ckpt: Annotated[Path, typer.Option("--ckpt", help="The teacher checkpoint the store was made with.")],
    data: Annotated[Path, typer.Option("--data", help="The dataset dir the store was made from.")] = default_data_dir("cifar100"),
    samples: Annotated[int, typer.Option("--samples", help="Random stored views to recompute (at most every stored view once).")] = 512,
    tolerance: Annotated[Optional[float], typer.Option("--tolerance", help="Allowed logit difference beyond the slab's recorded encoding error (default: 1e-3 for slabs computed in fp32; in bf16 two bf16 steps of the row's largest logit, at least 5e-2).")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="cpu or cuda.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
    trust_checkpoint: TrustCheckpointOpt = False,
) -> None:
    """Recompute the teacher on random stored views and compare; exit 1 if any is off.

    Example: kdcache verify STORE --ckpt teacher.pth --data data/cifar100 --samples 512
    """
    result = verify(store, ckpt, data, samples=samples, tolerance=tolerance, device=device, trusted=trust_checkpoint,
                    progress=not quiet)
    typer.echo(f"{result['samples']} views: max |dz| {result['max_abs_diff']:.2e}, mean |dz| {result['mean_abs_diff']:.2e}, "
               f"top-1 agreement {100 * result['top1_agreement']:.2f}%, seeds match {100 * result['seeds_match']:.1f}%, "
               f"within tolerance {100 * result['within_tolerance']:.1f}%")
    if not result["ok"]:
        raise KdcacheError("verification failed: stored logits differ from the teacher beyond tolerance")
    typer.echo("ok")
