"""`kdcache data ...`: prepare datasets into FFCV betons and show their metadata."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer

from kdcache.data import DatasetMeta, list_sources, prepare_dataset

data_app = typer.Typer(help="Prepare datasets (FFCV .beton + meta.json) and inspect them.", no_args_is_help=True)


@data_app.command("prepare")
def prepare(
    source: str = typer.Argument(..., help=f"Dataset source: {', '.join(list_sources())}."),
    out: Path = typer.Option(..., "--out", help="Output directory (train.beton, test.beton, meta.json)."),
    root: Optional[Path] = typer.Option(None, "--root", help="Source files: a directory, or the .npz file for npz."),
    size: Optional[int] = typer.Option(None, "--size", help="Square size. Arrays: smaller images are zero-padded (centred), larger ones resized + centre-cropped. Image folders: shorter side resized to N, then centre-cropped; without --size they keep each image's own size."),
    jpeg: Optional[bool] = typer.Option(None, "--jpeg/--raw", help="Store images JPEG-encoded (quality 90) or raw. Default: JPEG for imagefolder without --size, raw otherwise.", show_default=False),
    max_side: Optional[int] = typer.Option(None, "--max-side", help="imagefolder/tiny-imagenet without --size: shrink images whose longer side exceeds N to N (aspect kept), like FFCV's max_resolution."),
    normalization: Optional[str] = typer.Option(None, "--normalization", help="Mean/std to record: 'dataset' (the train split's) or 'imagenet' (torchvision's). Default: the source's published values (CIFAR: the zoos', imagefolder: imagenet, tiny-imagenet: mdistiller's), else dataset."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
    max_train: Optional[int] = typer.Option(None, "--max-train", help="Keep only the first N training samples."),
    max_test: Optional[int] = typer.Option(None, "--max-test", help="Keep only the first N test samples."),
) -> None:
    """Write a dataset as FFCV betons with fields image, label, index.

    Example: kdcache data prepare fashion-mnist --out data/fmnist --size 32

    Example: kdcache data prepare imagefolder --root ~/datasets/imagenet --out data/imagenet --max-side 512
    """
    start = time.perf_counter()
    meta = prepare_dataset(source, out, root=root, size=size, jpeg=jpeg, max_side=max_side,
                           normalization=normalization, overwrite=overwrite, max_train=max_train, max_test=max_test)
    shape = "3 x own size" if meta.own_size else "x".join(map(str, meta.image_shape))
    typer.echo(
        f"{meta.name}: train {meta.counts['train']}, test {meta.counts['test']}, "
        f"image {shape} {meta.image_encoding}, {meta.num_classes} classes, "
        f"fingerprint {meta.fingerprint[:12]}, {time.perf_counter() - start:.1f} s -> {out}"
    )


@data_app.command("info")
def info(directory: Path = typer.Argument(..., help="A directory written by `kdcache data prepare`.")) -> None:
    """Print a prepared dataset's meta.json.

    Example: kdcache data info data/fmnist
    """
    meta = DatasetMeta.load(directory)
    typer.echo(json.dumps(meta.__dict__, indent=2))
