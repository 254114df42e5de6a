"""metrics.csv and TensorBoard event files of a run dir, read back with the csv module and TensorBoard's own reader."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from kdcache.runlog import append_epoch, rewrite_run_log, start_run_log


def record(epoch: int, **extra: float) -> dict[str, float]:
    """An epoch record shaped like the ones engine.fit writes (crld parts included)."""
    return {"epoch": epoch, "round": epoch - 1, "lr": 0.05, "train_loss": 2.0 / epoch, "train_top1": 10.0 * epoch,
            "train_crld_weak": 1.0 / 3 / epoch, "test_top1": 11.5 * epoch, "best_top1": 11.5 * epoch,
            "epoch_time_s": 1.25, **extra}


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag TensorBoard finds in the run dir: [(step, value)]."""
    reader = EventAccumulator(str(run_dir))
    reader.Reload()
    return {tag: [(event.step, event.value) for event in reader.Scalars(tag)] for tag in reader.Tags()["scalars"]}


def csv_rows(run_dir: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def event_files(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("events.out.tfevents.*"))


def test_epochs_round_trip_through_tensorboard_and_csv(tmp_path):
    start_run_log(tmp_path)
    records = [record(e) for e in (1, 2, 3)]
    for r in records:
        append_epoch(tmp_path, r)
    found = scalars(tmp_path)
    assert sorted(found) == ["epoch_time_s", "lr", "round", "test/best_top1", "test/top1", "train/crld_weak",
                             "train/loss", "train/top1"]
    # TensorBoard stores float32: the values are the records' values rounded to float32, at step = epoch.
    assert found["train/loss"] == [(r["epoch"], float(np.float32(r["train_loss"]))) for r in records]
    assert found["train/crld_weak"] == [(r["epoch"], float(np.float32(r["train_crld_weak"]))) for r in records]
    assert found["lr"] == [(e, float(np.float32(0.05))) for e in (1, 2, 3)]
    header, rows = csv_rows(tmp_path)
    assert header == list(records[0])
    assert [{k: float(v) for k, v in row.items()} for row in rows] == records  # exact: csv keeps every digit


def test_rewrite_keeps_exactly_the_history(tmp_path):
    start_run_log(tmp_path)
    for e in range(1, 6):
        append_epoch(tmp_path, record(e))
    rewrite_run_log(tmp_path, [record(e) for e in (1, 2, 3)])  # resume from the epoch-3 checkpoint
    assert len(event_files(tmp_path)) == 1
    assert [step for step, _ in scalars(tmp_path)["test/top1"]] == [1, 2, 3]
    assert [row["epoch"] for row in csv_rows(tmp_path)[1]] == ["1", "2", "3"]
    append_epoch(tmp_path, record(4, test_top1=99.0))
    assert scalars(tmp_path)["test/top1"][-2:] == [(3, 34.5), (4, 99.0)]
    assert [row["test_top1"] for row in csv_rows(tmp_path)[1]] == ["11.5", "23.0", "34.5", "99.0"]


def test_a_key_that_appears_mid_run_adds_a_column(tmp_path):
    start_run_log(tmp_path)
    append_epoch(tmp_path, record(1))
    append_epoch(tmp_path, record(2, train_dkd_tckd=0.75))
    header, rows = csv_rows(tmp_path)
    assert header == [*record(1), "train_dkd_tckd"]
    assert [row["train_dkd_tckd"] for row in rows] == ["", "0.75"]
    assert scalars(tmp_path)["train/dkd_tckd"] == [(2, 0.75)]


def test_start_replaces_an_earlier_runs_logs(tmp_path):
    start_run_log(tmp_path)
    append_epoch(tmp_path, record(1))
    start_run_log(tmp_path)
    assert (tmp_path / "metrics.csv").read_text() == ""
    assert len(event_files(tmp_path)) == 1 and scalars(tmp_path) == {}


def test_a_kill_mid_write_is_repaired_by_the_resume(tmp_path):
    start_run_log(tmp_path)
    for e in (1, 2, 3):
        append_epoch(tmp_path, record(e))
    events = event_files(tmp_path)[0]
    events.write_bytes(events.read_bytes()[:-20])  # epoch 3's record cut short
    (tmp_path / ".metrics.csv.x1y2.tmp").write_text("epoch,lo")  # a csv write killed before its rename
    assert [step for step, _ in scalars(tmp_path)["train/loss"]] == [1, 2]  # TensorBoard reads what is whole
    rewrite_run_log(tmp_path, [record(1), record(2)])
    append_epoch(tmp_path, record(3))
    assert [step for step, _ in scalars(tmp_path)["train/loss"]] == [1, 2, 3]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no leftover temporaries
