"""kdcache report on synthetic run dirs (config.json + metrics.jsonl written here, no training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from kdcache.errors import KdcacheError
from kdcache.report import load_run, report


def make_run(root: Path, name: str, *, loss: str = "kd", mode: str = "cached", rounds: int | None = 4,
             epochs: int = 4, top1: float = 50.0, epoch_time: float = 2.0, student: str = "resnet8") -> Path:
    """A run dir as engine.fit writes it, with made-up numbers."""
    run = root / name
    run.mkdir(parents=True)
    config = {"student": student, "loss": loss, "loss_params": {}, "recipe": {"epochs": epochs},
              "data": "/data/digits", "teacher_mode": mode}
    if rounds is not None:
        config.update(store="/stores/s", store_rounds=rounds, teacher="resnet8")
    (run / "config.json").write_text(json.dumps(config))
    records = []
    for e in range(1, epochs + 1):
        acc = top1 * e / epochs
        records.append({"epoch": e, "round": (e - 1) % (rounds or epochs), "lr": 0.05, "train_loss": 2.0 / e,
                        "train_top1": acc, "epoch_time_s": epoch_time, "train_images_per_s": 1000 / epoch_time,
                        "test_top1": acc, "test_top5": 90.0, "test_loss": 1.0, "test_images_per_s": 5000.0,
                        "best_top1": acc})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


def assert_png(path: Path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 400 and image.height > 300


def test_report_writes_every_figure_and_the_summary(tmp_path):
    runs = [make_run(tmp_path, f"kd-r{r}", rounds=r, top1=40 + r) for r in (1, 4, 16)]
    runs += [make_run(tmp_path, f"crld-r{r}", loss="crld", rounds=r, top1=45 + r) for r in (1, 4, 16)]
    runs.append(make_run(tmp_path, "kd-online", mode="online", rounds=None, epoch_time=6.0, top1=41))
    written = report(runs, tmp_path / "out")
    assert [p.name for p in written] == ["curves.png", "rounds.png", "cached_vs_online.png", "summary.md"]
    for png in written[:3]:
        assert_png(png)
    summary = written[-1].read_text()
    assert "| kd-r16 | resnet8 | kd | cached | 16 | 4 | 56.00 | 56.00 | 2.00 | 500 |" in summary
    assert "| kd-online | resnet8 | kd | online | - |" in summary
    # The online run pairs with the first cached kd run given.
    assert "| resnet8 | kd | kd-r1 | kd-online | 2.00 | 6.00 | 3.00x | 41.00 / 41.00 |" in summary
    assert "[rounds.png](rounds.png)" in summary


def test_rounds_and_cached_vs_online_only_when_they_apply(tmp_path):
    runs = [make_run(tmp_path, "kd"), make_run(tmp_path, "crld", loss="crld"),
            make_run(tmp_path, "ce", loss="ce", mode="none", rounds=None)]
    written = report(runs, tmp_path / "out")
    assert [p.name for p in written] == ["curves.png", "summary.md"]
    assert "Cached vs online" not in written[-1].read_text()


def test_load_run_reads_metrics(tmp_path):
    run = load_run(make_run(tmp_path, "kd", epochs=3, top1=30.0, epoch_time=4.0))
    assert (run.student, run.loss, run.mode, run.rounds) == ("resnet8", "kd", "cached", 4)
    assert run.epochs == [1, 2, 3]
    assert (run.best_top1, run.final_top1, run.mean_epoch_time, run.images_per_s) == (30.0, 30.0, 4.0, 250.0)


def test_not_a_run_dir_is_named(tmp_path):
    good = make_run(tmp_path, "kd")
    with pytest.raises(KdcacheError, match="nowhere is not a run dir"):
        report([good, tmp_path / "nowhere"], tmp_path / "out")
    with pytest.raises(KdcacheError, match="no run dir"):
        report([], tmp_path / "out")


@pytest.mark.parametrize("config, metrics, message", [
    ("{not json", "", "corrupt"),
    ('{"student": "resnet8"}', '{"epoch": 1}\n', "lack"),
    ('["a list"]', "", "not JSON objects"),
    ('{"student": "resnet8", "loss": "kd"}', "", "no finished epoch"),
])
def test_bad_run_dirs(tmp_path, config, metrics, message):
    run = tmp_path / "bad"
    run.mkdir()
    (run / "config.json").write_text(config)
    (run / "metrics.jsonl").write_text(metrics)
    with pytest.raises(KdcacheError, match=message):
        load_run(run)
