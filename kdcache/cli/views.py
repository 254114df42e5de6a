"""`kdcache views`: look at the views a policy makes of a prepared dataset's images."""

from pathlib import Path

import torch
import typer

from kdcache.augment import get_policy, render_grid, view_seeds
from kdcache.errors import KdcacheError
from kdcache.outputs import check_png_out, write_atomic
from kdcache.replay import DEFAULT_VIEWS

views_app = typer.Typer(help="Inspect seeded augmentation views.", no_args_is_help=True)


def parse_indices(text: str) -> list[int]:
    """'0-15', '3,7,9' or '0-3,10' -> sample indices."""
    indices = []
    try:
        for part in text.split(","):
            first, _, last = part.strip().partition("-")
            indices.extend(range(int(first), int(last or first) + 1))
    except ValueError:
        raise KdcacheError(f"--index {text!r} is not a list of indices or ranges such as 0-15 or 3,7,9") from None
    if not indices:
        raise KdcacheError(f"--index {text!r} selects no sample")
    return indices


def slot_number(slot: str | None, policy: str) -> int:
    """The slot number in the view key, as precompute assigns it with its default `--views weak,strong`
    (a slot's number is its position): `slot` is a number or a slot name; None picks the slot
    whose name ends the policy's (strong, imagenet_strong: 1; weak, imagenet_weak: 0), else 0."""
    names = list(DEFAULT_VIEWS)
    if slot is None:
        return next((i for i, name in enumerate(names) if policy.endswith(name)), 0)
    if slot in names:
        return names.index(slot)
    if slot.isdigit():
        return int(slot)
    raise KdcacheError(f"--slot {slot!r} is neither a slot number nor one of {', '.join(names)}")


@views_app.command()
def show(
    data: Path = typer.Option(..., help="Prepared dataset folder (kdcache data prepare)."),
    policy: str = typer.Option("strong", help="View policy name."),
    split: str = typer.Option("train", help="Dataset split."),
    round: int = typer.Option(0, help="First round to show."),
    slot: str | None = typer.Option(None, help="View slot: a number, or weak (0) / strong (1) as precompute's default "
                             "--views weak,strong numbers them. Default: the slot of the policy there (strong: 1).",
                             show_default=False),
    seed: int = typer.Option(0, help="Store seed."),
    index: str = typer.Option("0-15", help="Sample indices, e.g. 0-15 or 3,7,9."),
    views: int = typer.Option(8, min=1, help="Views per sample: rounds ROUND .. ROUND+VIEWS-1."),
    size: int = typer.Option(0, help="Output size in pixels; 0: the data's image height."),
    scale: int = typer.Option(4, min=1, help="Upscale factor of the PNG."),
    out: Path = typer.Option(Path("views.png"), help="PNG file to write."),
) -> None:
    """One row per sample: the image (identity view), then its views for consecutive rounds.

    Example: kdcache views show --data data/fmnist --policy strong --index 0-7 --out views.png
    """
    from kdcache.data import load_split

    check_png_out(out)
    images, _ = load_split(data, split)
    indices = parse_indices(index)
    if max(indices) >= len(images) or min(indices) < 0:
        raise KdcacheError(f"--index {index!r} is out of range: split {split!r} has {len(images)} samples")
    size = size or images.shape[-2]
    view_policy = get_policy(policy, size)
    slot_id = slot_number(slot, policy)
    chosen = images[indices]
    idx = torch.tensor(indices)
    seeds = torch.stack([view_seeds(seed, r, slot_id, idx) for r in range(round, round + views)], dim=1)
    shown = view_policy(chosen.repeat_interleave(views, dim=0), seeds.reshape(-1))
    originals = get_policy("identity", size)(chosen, torch.zeros(len(indices), dtype=torch.int64))
    grid = torch.cat([originals[:, None], shown.view(len(indices), views, *shown.shape[1:])], dim=1)
    write_atomic(out, lambda tmp: render_grid(grid.flatten(0, 1), tmp, ncol=views + 1, scale=scale))
    typer.echo(f"wrote {out}: {len(indices)} samples x (original + {views} {policy} views, "
               f"rounds {round}..{round + views - 1}, slot {slot_id})")
