"""Train your own student from a kdcache store in a plain PyTorch loop: your model, your
optimizer, no teacher in memory and no kdcache engine.

    kdcache data prepare digits --out data/digits --size 16
    kdcache train --model resnet8 --data data/digits --epochs 5 --batch-size 64 --lr 0.1 --out runs/teacher
    kdcache precompute --teacher resnet8 --ckpt runs/teacher/last.pth --data data/digits \\
        --views weak --rounds 4 --out stores/digits
    python examples/train_from_store.py --data data/digits --store stores/digits --epochs 8

Each epoch uses one round of the store (epoch mod rounds); any order of rounds works.
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from kdcache.api import DatasetMeta, TeacherLogits, eval_views, make_loader, open_store, replayer_for


def small_cnn(num_classes: int) -> nn.Module:
    """Your own student: any nn.Module mapping normalised images [B,3,H,W] to logits [B,C]."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(64 * 4 * 4, num_classes),
    )


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, T: float = 4.0) -> torch.Tensor:
    """Hinton et al.'s KD: softened KL to the teacher (scaled by T^2) plus cross-entropy."""
    kl = F.kl_div(F.log_softmax(student / T, dim=1), F.log_softmax(teacher / T, dim=1), log_target=True,
                  reduction="batchmean")
    return 0.9 * T * T * kl + 0.1 * F.cross_entropy(student, labels)


@torch.no_grad()
def test_top1(model: nn.Module, data_dir: str, meta: DatasetMeta, device: torch.device) -> float:
    """Top-1 accuracy (%) on the un-augmented test split."""
    model.eval()
    correct = 0
    for images, labels, _ in make_loader(data_dir, "test", 256, shuffle=False, device=device):
        correct += (model(eval_views(images, meta.mean, meta.std)).argmax(1) == labels).sum().item()
    model.train()
    return 100.0 * correct / meta.counts["test"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="dataset folder written by `kdcache data prepare`")
    parser.add_argument("--store", required=True, help="logit store written by `kdcache precompute` from --data")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.02)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)

    meta = DatasetMeta.load(args.data)
    store = open_store(args.store, args.data, ["weak"])
    replay = replayer_for(store)  # the views precompute showed the teacher, from their keys
    teacher = TeacherLogits(store, device)  # the teacher's stored logits of those views
    loader = make_loader(args.data, "train", args.batch_size, shuffle=True, device=device, drop_last=True)
    model = small_cnn(meta.num_classes).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)

    for epoch in range(args.epochs):
        round_ = epoch % store.rounds
        loader.set_epoch(epoch)
        loss_sum = torch.zeros((), device=device)
        for images, labels, indices in loader:
            views = replay(round_, "weak", images, indices)
            loss = kd_loss(model(views), teacher(round_, "weak", indices), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach()  # read once per epoch: no host sync per step
        print(f"epoch {epoch + 1} round {round_} train_loss {loss_sum.item() / len(loader):.4f} "
              f"test_top1 {test_top1(model, args.data, meta, device):.2f}", flush=True)


if __name__ == "__main__":
    main()
