"""How firm is the demo's verdict? Many seeds of a few demo students, and how often a table
with fewer seeds would read a gain over CE as beyond the spread.

The demo's reading calls a gain real when it exceeds the sum of the two students' seed
stds; with 3 seeds those stds are rough, so two runs of one plan can read differently.
This trains --seeds seeds of each of --students in a demo plan (reusing the workdir's data,
teacher and store, and every result already there: a finished `kdcache demo`'s and this
script's earlier ones, kept in demo_seeds.jsonl; CE ignores the teacher), prints
mean ± std over all of them, and for each table size k in --subsets the share of k-seed
subsets (the same seed numbers for every student, as a demo would draw) whose reading puts
each distilled student beyond CE's spread.

    python benchmarks/demo_seeds.py --workdir ~/.kdcache/demo --students ce,kd --seeds 10
    python benchmarks/demo_seeds.py --workdir W --set teacher_epochs=30 --set max_train=4000

Writes seeds-<plan>/results.json in the workdir.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time
from pathlib import Path

from kdcache.demo import PLANS, DemoPlan, STUDENTS, compare, demo_inputs, mean_std, train_student


def plan_with(name: str, settings: list[str]):
    """The named plan with `field=value` overrides (int fields parsed as ints)."""
    plan = PLANS[name]
    changes = {}
    for setting in settings:
        key, value = setting.split("=", 1)
        changes[key] = type(getattr(plan, key))(value) if getattr(plan, key) is not None else int(value)
    return dataclasses.replace(plan, **changes)


def run_key(plan: DemoPlan, run: str) -> dict:
    """What a student's result depends on: the plan less its name and seed count, and for
    the CE baseline, which never sees the teacher, less the teacher's fields too."""
    skip = {"name", "seeds"} | ({"teacher", "teacher_epochs", "teacher_lr"} if run == "ce" else set())
    return {k: v for k, v in dataclasses.asdict(plan).items() if k not in skip}


def read_done(workdir: Path) -> dict[str, dict]:
    """Results already in the workdir: a finished demo's summary.json and earlier runs of this script."""
    done = {}
    for summary_path in workdir.glob("runs-*/summary.json"):
        summary = json.loads(summary_path.read_text())
        plan = DemoPlan(**summary["plan"])
        for row in summary["students"]:
            for run in row["seeds"]:
                done[json.dumps([run_key(plan, row["run"]), row["run"], run["seed"]])] = run
    log = workdir / "demo_seeds.jsonl"
    for line in log.read_text().splitlines() if log.exists() else []:
        entry = json.loads(line)
        done[entry.pop("key")] = entry
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--plan", default="default", choices=sorted(PLANS))
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a DemoPlan field")
    parser.add_argument("--students", default="ce,kd", help="run names from kdcache.demo.STUDENTS; ce is the baseline")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--subsets", default="3,5")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    plan = plan_with(args.plan, args.set)
    chosen = [s for s in STUDENTS if s[0] in args.students.split(",")]

    start = time.perf_counter()
    data_dir, teacher_ckpt, teacher_top1, store = demo_inputs(plan, args.workdir, args.device)
    done = read_done(args.workdir)
    runs_dir = args.workdir / "-".join([f"seeds-{plan.name}", *args.set])
    results = {}
    for student in chosen:
        results[student[0]] = []
        for seed in range(args.seeds):
            key = json.dumps([run_key(plan, student[0]), student[0], seed])
            if key not in done:
                done[key] = train_student(plan, student, seed, data_dir, teacher_ckpt, store.path, runs_dir,
                                          args.device)
                with open(args.workdir / "demo_seeds.jsonl", "a") as f:
                    f.write(json.dumps({"key": key, **done[key]}) + "\n")
            results[student[0]].append(done[key])
        top1 = [r["test_top1"] for r in results[student[0]]]
        stats = mean_std(top1, "top1")
        print(f"{student[0]:>12}: {stats['top1']:.2f} ± {stats['top1_std']:.2f} over {args.seeds} seeds "
              f"({', '.join(f'{t:.2f}' for t in top1)})", flush=True)

    firmness = {}
    for k in (int(k) for k in args.subsets.split(",")):
        subsets = list(itertools.combinations(range(args.seeds), k))
        for name in [n for n in results if n != "ce" and "ce" in results]:
            beyond = 0
            for subset in subsets:
                gain, _, verdict = compare(*(mean_std([results[n][s]["test_top1"] for s in subset], "test_top1")
                                             for n in (name, "ce")))
                beyond += verdict == "beyond" and gain > 0
            firmness[f"{name} k={k}"] = beyond / len(subsets)
            print(f"{k} seeds: {name} beyond CE's spread in {beyond}/{len(subsets)} subsets "
                  f"({100 * beyond / len(subsets):.0f}%)", flush=True)
    runs_dir.mkdir(parents=True, exist_ok=True)
    (runs_dir / "results.json").write_text(json.dumps({
        "plan": dataclasses.asdict(plan), "teacher_test_top1": teacher_top1, "results": results,
        "firmness": firmness, "time_s": time.perf_counter() - start}, indent=2) + "\n")


if __name__ == "__main__":
    main()
