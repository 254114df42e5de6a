"""What a top-k logit store does to each distillation loss, measured on real logits.

A top-k store keeps a row's k largest logits and replaces the other C - k by one
constant (docs/store-format.md, "Top-k and the losses"). How much that changes what a
loss sees depends on how much of the teacher's distribution lies outside its top k, so
it has to be measured on the logits of a trained network, not on random numbers.

No trained 100- or 1000-class image teacher is available offline here (torchvision and
timm weights are downloads, CIFAR-100 and ImageNet are not on disk), so this script
trains one: kdcache's resnet8 on Fashion-MNIST (Debian's dataset-fashion-mnist), whose
10 classes are each split into C/10 k-means clusters of their pixels. That gives C
fine-grained classes that the teacher confuses with their neighbours, as ImageNet
teachers confuse dog breeds. The teacher's logits on the 10,000 held-out test images go
through the real top-k encoder and decoder and are compared with the float32 originals:

- the tail: mean softmax mass outside the top k, at T=1 and T=4;
- KL(teacher || decoded) at T=1 and T=4 (KD, DKD and CRLD use T=4 on CIFAR-100, T=1 on
  ImageNet), and DKD's non-target (NCKD) KL at T=4;
- DIST/CMKD: Pearson between full and decoded softmax rows at T=1 and T=4, DIST's
  intra-class Pearson (per class over batches of 64), Spearman of the rows (CMKD);
- each loss (CE weight 0, so only its distillation terms): the cosine between its gradient
  on the student logits with the full and with the decoded teacher, per batch of 64 (the
  first 2,048 test images), and the relative change of its value. The student is the
  same network after one epoch.

    python benchmarks/topk_tail.py [--classes 100,1000] [--ks 5,10,20] [--epochs 4] [--cache DIR]

About 30 minutes on 2 busy CPU cores: training the two teachers (about 20), then CMKD's
soft ranks at C = 1000 (B * C^2 per batch). With --cache, a second run reuses the
teachers' logits and skips the training.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans

from kdcache.data.sources import read_source
from kdcache.losses import get_loss
from kdcache.losses.functional import average_rank, kl_rows, pearson
from kdcache.models import create_model
from kdcache.storage import get_encoding

BATCH = 64  # the CIFAR recipe's batch: DIST's intra-class term and the loss gradients use it
LOSS_ROWS = 2048  # rows for the loss gradients: CMKD's soft ranks cost B * C^2 per batch
# Each loss with its CE term off, at its CIFAR-100 defaults and at T=1 (ImageNet's T for KD
# and DKD in mdistiller's configs, for CRLD in its paper, and DIST's code default).
LOSSES = {
    "kd": {"ce_weight": 0.0},
    "dkd": {"ce_weight": 0.0},
    "dist": {"ce_weight": 0.0},
    "crld": {"w_ce": 0.0},
    "cmkd": {"ce_weight": 0.0},
}


def fashion_mnist() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train and test images as float [N, 3, 28, 28] in 0..1, and their labels."""
    data = read_source("fashion-mnist", None, None)

    def images(split):
        return torch.from_numpy(split.images.copy()).permute(0, 3, 1, 2).float().div(255).repeat(1, 3, 1, 1)

    return (images(data.train), torch.from_numpy(data.train.labels),
            images(data.test), torch.from_numpy(data.test.labels))


def split_classes(train_x, train_y, test_x, test_y, num_classes: int, seed: int = 0):
    """Labels of `num_classes` fine-grained classes: each class's k-means clusters (on
    its training pixels), test images assigned to the nearest cluster of their class."""
    per_class = num_classes // 10
    train_sub, test_sub = torch.empty_like(train_y), torch.empty_like(test_y)
    for c in range(10):
        pixels = train_x[train_y == c, 0].flatten(1).numpy()
        kmeans = KMeans(per_class, n_init=1, random_state=seed).fit(pixels)
        train_sub[train_y == c] = torch.from_numpy(kmeans.labels_).long() + c * per_class
        test_pixels = test_x[test_y == c, 0].flatten(1).numpy()
        test_sub[test_y == c] = torch.from_numpy(kmeans.predict(test_pixels)).long() + c * per_class
    return train_sub, test_sub


def train(x, y, num_classes: int, epochs: int, seed: int = 0):
    """A resnet8 teacher (SGD, one-cycle LR, flips) and a copy of it after one epoch (the student)."""
    torch.manual_seed(seed)
    model = create_model("resnet8", num_classes)
    optimizer = torch.optim.SGD(model.parameters(), momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = epochs * math.ceil(len(x) / 128)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 0.1, total_steps=steps, pct_start=0.15)
    student = None
    for epoch in range(epochs):
        model.train()
        for batch in torch.randperm(len(x)).split(128):
            images = x[batch]
            flip = torch.rand(len(batch)) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(3), images)
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(images), y[batch]).backward()
            optimizer.step()
            schedule.step()
        if epoch == 0:
            student = create_model("resnet8", num_classes)
            student.load_state_dict(model.state_dict())
    return model.eval(), student.eval()


@torch.no_grad()
def logits_of(model, x) -> torch.Tensor:
    return torch.cat([model(batch) for batch in x.split(500)])


def top_k_decoded(logits: torch.Tensor, k: int) -> torch.Tensor:
    """What a topk:k store gives back for these float32 logits."""
    encoding = get_encoding(f"topk:{k}")
    return encoding.decode(encoding.encode(logits.numpy()), logits.shape[1])


def kl(full, decoded, T: float) -> torch.Tensor:
    """Per row KL(softmax(full / T) || softmax(decoded / T))."""
    return kl_rows(F.log_softmax(decoded / T, dim=1), F.log_softmax(full / T, dim=1))


def tail_mass(full, k: int, T: float) -> torch.Tensor:
    """Per row softmax(full / T) mass outside the top k classes."""
    return 1 - F.softmax(full / T, dim=1).topk(k, dim=1).values.sum(1)


def non_target_kl(full, decoded, labels, T: float) -> torch.Tensor:
    """DKD's NCKD divergence: KL of the distributions over the non-target classes."""
    mask = F.one_hot(labels, full.shape[1]).bool()
    return kl(full.masked_fill(mask, -1e9), decoded.masked_fill(mask, -1e9), T)


def intra_class_pearson(full, decoded, T: float) -> float:
    """DIST's intra-class relation: per class, Pearson over a batch's rows; mean over batches."""
    p, q = F.softmax(full / T, dim=1), F.softmax(decoded / T, dim=1)
    rows = len(p) // BATCH * BATCH
    p, q = p[:rows].view(-1, BATCH, p.shape[1]), q[:rows].view(-1, BATCH, q.shape[1])
    return float(pearson(p.transpose(1, 2).flatten(0, 1), q.transpose(1, 2).flatten(0, 1)).mean())


def distribution_row(full, decoded, labels, k: int) -> dict:
    """How far the decoded rows are from the full ones, in the terms each loss reads (float64)."""
    full, decoded = full.double(), decoded.double()
    return {
        "tail T=1": float(tail_mass(full, k, 1).mean()),
        "tail T=4": float(tail_mass(full, k, 4).mean()),
        "KL T=1": float(kl(full, decoded, 1).mean()),
        "KL T=4": float(kl(full, decoded, 4).mean()),
        "NCKD KL T=4": float(non_target_kl(full, decoded, labels, 4).mean()),
        "Pearson T=1": float(pearson(F.softmax(full, 1), F.softmax(decoded, 1)).mean()),
        "Pearson T=4": float(pearson(F.softmax(full / 4, 1), F.softmax(decoded / 4, 1)).mean()),
        "intra Pearson T=4": intra_class_pearson(full, decoded, 4),
        "Spearman": float(pearson(average_rank(full), average_rank(decoded)).mean()),
    }


def loss_effect(name: str, params: dict, student, full, decoded, labels) -> tuple[float, float]:
    """(mean gradient cosine, mean relative change of the loss) over batches of BATCH rows,
    full vs decoded teacher logits."""
    loss = get_loss(name, **params)
    cosines, changes = [], []
    for rows in torch.arange(LOSS_ROWS).split(BATCH):
        values, grads = [], []
        for teacher in (full[rows], decoded[rows]):
            zs = student[rows].clone().requires_grad_(True)
            views = len(loss.views)  # CRLD's two views: the same images twice here
            value = loss([zs] * views, [teacher] * views, labels[rows], epoch=1000)[0]
            grads.append(torch.autograd.grad(value, zs)[0].flatten())
            values.append(float(value.detach()))
        cosines.append(float(F.cosine_similarity(grads[0], grads[1], dim=0)))
        changes.append(abs(values[1] - values[0]) / max(abs(values[0]), 1e-12))
    return float(np.mean(cosines)), float(np.mean(changes))


def teacher_logits(train_x, train_y, test_x, test_y, num_classes: int, epochs: int, cache: Path | None):
    """Logits of the trained teacher and of the one-epoch student on the test images, with
    the test images' fine-grained labels and facts about the teacher; cached if asked."""
    cached = cache / f"fashion-mnist-{num_classes}-classes-{epochs}-epochs.pt" if cache else None
    if cached is not None and cached.exists():
        return torch.load(cached)
    start = time.time()
    train_sub, test_sub = split_classes(train_x, train_y, test_x, test_y, num_classes)
    teacher, student = train(train_x, train_sub, num_classes, epochs)
    full = logits_of(teacher, test_x)
    facts = {"C": num_classes, "test top-1": float((full.argmax(1) == test_sub).float().mean()),
             "mean max prob": float(F.softmax(full, dim=1).max(1).values.mean()),
             "train s": round(time.time() - start)}
    result = full, logits_of(student, test_x), test_sub, facts
    if cached is not None:
        cache.mkdir(parents=True, exist_ok=True)
        torch.save(result, cached)
    print(f"teacher for C={num_classes} trained in {facts['train s']} s", file=sys.stderr)
    return result


def markdown(rows: list[dict]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", default="100,1000", help="fine-grained class counts, multiples of 10")
    parser.add_argument("--ks", default="5,10,20", help="top-k sizes to measure")
    parser.add_argument("--epochs", type=int, default=4, help="teacher training epochs")
    parser.add_argument("--cache", type=Path, help="folder to keep the teachers' logits in and reuse them from")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the student is the teacher after its first epoch")
    ks = [int(k) for k in args.ks.split(",")]
    train_x, train_y, test_x, test_y = fashion_mnist()
    distribution, losses, teachers = [], [], []
    for num_classes in (int(c) for c in args.classes.split(",")):
        full, student_logits, test_sub, facts = teacher_logits(
            train_x, train_y, test_x, test_y, num_classes, args.epochs, args.cache)
        teachers.append(facts)
        decoded = {k: top_k_decoded(full, k) for k in ks}
        for k in ks:
            size = get_encoding(f"topk:{k}").bytes_per_row(num_classes) + 8  # + the 8-byte seed
            distribution.append({"C": num_classes, "k": k, "B/view-sample": size,
                                 "% of float16": round(100 * size / (2 * num_classes + 8), 1),
                                 **distribution_row(full, decoded[k], test_sub, k)})
        for name, params in LOSSES.items():
            temperature = get_loss(name).temperature
            for setting in (params, {**params, temperature: 1.0}):
                row = {"C": num_classes, "loss": name, "T": get_loss(name, **setting).params[temperature]}
                for k in ks:
                    cosine, change = loss_effect(name, setting, student_logits, full, decoded[k], test_sub)
                    row[f"grad cos k={k}"], row[f"rel. change k={k}"] = cosine, change
                losses.append(row)
    print("Teachers (resnet8 on Fashion-MNIST sub-classes, 10,000 held-out test images):\n")
    print(markdown(teachers))
    print("\nDecoded top-k rows against the full float32 rows (means over rows):\n")
    print(markdown(distribution))
    print("\nEach loss's distillation terms (CE off), full vs decoded teacher, batches of 64:\n")
    print(markdown(losses))


if __name__ == "__main__":
    main()
