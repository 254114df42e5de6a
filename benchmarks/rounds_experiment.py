"""Accuracy vs number of cached rounds: how many distinct augmented views per sample does a
student need from the store?

One store with `max(--rounds)` rounds of weak + strong views; for each loss and each N in
--rounds, a student trains for --epochs epochs using only the store's first N rounds (epoch e
uses round e mod N). N = epochs means fresh views every epoch, as online distillation sees.

    python benchmarks/rounds_experiment.py --data DIR --teacher resnet20 --ckpt T.pth \
        --student resnet8 --epochs 8 --rounds 1,2,4,8 --losses kd,crld --out runs/rounds

Prints a table, writes results.json and the run dirs (feed them to `kdcache report`).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from kdcache.distill import DistillConfig, distill
from kdcache.precompute import PrecomputeConfig, precompute
from kdcache.recipes import make_recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--student", default="resnet8")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--rounds", default="1,2,4,8")
    parser.add_argument("--losses", default="kd,crld")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rounds = sorted({int(r) for r in args.rounds.split(",")})
    if rounds[-1] > args.epochs:
        parser.error("--rounds larger than --epochs would leave rounds unused")

    store = precompute(PrecomputeConfig(teacher=args.teacher, ckpt=args.ckpt, data_dir=args.data,
                                        views={"weak": "weak", "strong": "strong"}, rounds=rounds[-1],
                                        out=args.out / "store", device=args.device))
    results = []
    for loss in args.losses.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            for n in rounds:
                run_dir = args.out / f"{loss}-r{n}-s{seed}"
                shutil.rmtree(run_dir, ignore_errors=True)
                recipe = make_recipe(args.student, epochs=args.epochs, batch_size=args.batch_size, seed=seed)
                history = distill(DistillConfig(student=args.student, loss=loss, data_dir=args.data, out=run_dir,
                                                recipe=recipe, store=store.path, rounds=n, device=args.device,
                                                show_progress=False))
                row = {"loss": loss, "rounds": n, "seed": seed, "final_top1": history[-1]["test_top1"],
                       "best_top1": history[-1]["best_top1"], "run_dir": str(run_dir)}
                results.append(row)
                print(f"{loss:>5} rounds {n:>3} seed {seed}: final {row['final_top1']:.2f}%  best {row['best_top1']:.2f}%",
                      flush=True)
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "teacher_test_top1": store.attrs.get("teacher_test_top1"),
                                                       "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
