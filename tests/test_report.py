"""kdcache report on synthetic run dirs (config.json + metrics.jsonl written here, no training)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from kdcache.errors import KdcacheError
from kdcache.report import REPORT_FILES, curves_figure, load_run, report, rounds_figure, rounds_lines, seed_groups


def make_run(root: Path, name: str, *, loss: str = "kd", mode: str = "cached", rounds: int | None = 4,
             epochs: int = 4, top1: float = 50.0, epoch_time: float = 2.0, student: str = "resnet8", seed: int = 0,
             lr: float = 0.05) -> Path:
    """A run dir as engine.fit writes it, with made-up numbers."""
    run = root / name
    run.mkdir(parents=True)
    config = {"student": student, "loss": loss, "loss_params": {}, "recipe": {"epochs": epochs, "seed": seed, "lr": lr},
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


def assert_figure(path: Path) -> None:
    """A PNG, SVG or PDF file that its viewers open."""
    if path.suffix == ".png":
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 400 and image.height > 300
    elif path.suffix == ".svg":
        assert path.read_text().startswith("<?xml") and "<svg" in path.read_text()
    else:
        assert path.suffix == ".pdf" and path.read_bytes().startswith(b"%PDF-")


def test_report_writes_every_figure_and_the_summary(tmp_path):
    runs = [make_run(tmp_path, f"kd-r{r}", rounds=r, top1=40 + r) for r in (1, 4, 16)]
    runs += [make_run(tmp_path, f"crld-r{r}", loss="crld", rounds=r, top1=45 + r) for r in (1, 4, 16)]
    runs.append(make_run(tmp_path, "kd-online", mode="online", rounds=None, epoch_time=6.0, top1=41))
    written = report(runs, tmp_path / "out")
    assert [p.name for p in written] == [f"{figure}.{fmt}" for figure in ("curves", "rounds", "cached_vs_online")
                                         for fmt in ("png", "svg", "pdf")] + ["summary.md"]
    for figure in written[:-1]:
        assert_figure(figure)
    summary = written[-1].read_text()
    assert "| kd-r16 | resnet8 | kd | cached | 16 | 0 | 4 | 56.00 | 56.00 | 2.00 | 500 |" in summary
    assert "| kd-online | resnet8 | kd | online | - |" in summary
    # The online run pairs with the first cached kd run given.
    assert "| resnet8 | kd | kd-r1 | kd-online | 2.00 | 6.00 | 3.00x | 41.00 / 41.00 |" in summary
    assert "- [rounds.png](rounds.png) ([SVG](rounds.svg), [PDF](rounds.pdf))" in summary
    # --out safety knows every file a report writes: the same folder takes the next report.
    assert {p.name for p in written} <= set(REPORT_FILES)
    assert report(runs[:1], tmp_path / "out")[-1].name == "summary.md"


def test_rounds_and_cached_vs_online_only_when_they_apply(tmp_path):
    runs = [make_run(tmp_path, "kd"), make_run(tmp_path, "crld", loss="crld"),
            make_run(tmp_path, "ce", loss="ce", mode="none", rounds=None)]
    written = report(runs, tmp_path / "out")
    assert [p.name for p in written] == ["curves.png", "curves.svg", "curves.pdf", "summary.md"]
    assert "Cached vs online" not in written[-1].read_text()


def test_load_run_reads_metrics(tmp_path):
    run = load_run(make_run(tmp_path, "kd", epochs=3, top1=30.0, epoch_time=4.0))
    assert (run.student, run.loss, run.mode, run.rounds, run.seed) == ("resnet8", "kd", "cached", 4, 0)
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


def test_one_loss_axis_per_loss_with_run_names_in_the_legend(tmp_path):
    runs = [load_run(make_run(tmp_path, name, loss=loss, mode="none" if loss == "ce" else "cached", student=student))
            for name, loss, student in (("teacher", "ce", "resnet8"), ("kd-a", "kd", "resnet8"),
                                        ("crld-a", "crld", "resnet8"), ("kd-b", "kd", "resnet20"))]
    fig = curves_figure(seed_groups(runs))
    assert [ax.get_title() for ax in fig.axes] == ["Test top-1", "Train loss: ce", "Train loss: kd", "Train loss: crld"]
    lines_per_axis = [[line.get_label().split(" ")[0] for line in ax.get_lines()] for ax in fig.axes]
    assert lines_per_axis == [["teacher", "kd-a", "crld-a", "kd-b"], ["teacher"], ["kd-a", "kd-b"], ["crld-a"]]
    legend = [text.get_text() for text in fig.legends[0].get_texts()]
    assert legend[1] == "kd-a (resnet8/kd/cached, 4 rounds)"


def test_runs_that_differ_only_in_the_seed_are_drawn_as_mean_and_std(tmp_path):
    runs = [make_run(tmp_path, f"kd-s{seed}", seed=seed, top1=top1) for seed, top1 in ((0, 48.0), (1, 50.0), (2, 52.0))]
    runs.append(make_run(tmp_path, "kd-lr", lr=0.1))  # another recipe: not one of the seeds
    groups = seed_groups([load_run(run) for run in runs])
    assert [(g.name, len(g.runs)) for g in groups] == [("kd-s*", 3), ("kd-lr", 1)]
    acc_ax = curves_figure(groups).axes[0]
    seeds_line = acc_ax.get_lines()[0]
    assert seeds_line.get_label() == "kd-s* (resnet8/kd/cached, 4 rounds; mean ± std over seeds 0, 1, 2)"
    assert list(seeds_line.get_ydata()) == [12.5, 25.0, 37.5, 50.0]
    assert len(acc_ax.collections) == 1  # one std band: the single run has none
    band = acc_ax.collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() == pytest.approx(12.5 - 0.5) and band.max() == pytest.approx(50.0 + 2.0)
    summary = report(runs, tmp_path / "out")[-1].read_text()
    assert ("| kd-s* | resnet8 | kd | cached | 4 | 0, 1, 2 | 4 | 50.00 ± 2.00 | 50.00 ± 2.00 | 2.00 ± 0.00 |"
            in summary)


def test_rounds_lines_join_only_runs_of_the_same_epochs(tmp_path):
    runs = [make_run(tmp_path, f"kd-e{epochs}-r{rounds}-s{seed}", rounds=rounds, epochs=epochs, seed=seed,
                     top1=40.0 + rounds + seed)
            for epochs in (4, 8) for rounds in (1, 4) for seed in (0, 1)]
    lines = rounds_lines(seed_groups([load_run(run) for run in runs]))
    assert [[g.name for g in line] for line in lines] == [["kd-e4-r1-s*", "kd-e4-r4-s*"],
                                                          ["kd-e8-r1-s*", "kd-e8-r4-s*"]]
    handles, labels = rounds_figure(lines).axes[0].get_legend_handles_labels()
    assert labels == ["kd-e4-r*-s* (resnet8/kd, 4 epochs) final", "kd-e4-r*-s* (resnet8/kd, 4 epochs) best",
                      "kd-e8-r*-s* (resnet8/kd, 8 epochs) final", "kd-e8-r*-s* (resnet8/kd, 8 epochs) best"]
    final_4_epochs = handles[0].lines[0]  # the errorbar's data line: means over the two seeds
    assert list(final_4_epochs.get_xdata()) == [1, 4] and list(final_4_epochs.get_ydata()) == [41.5, 44.5]
    # Two rounds at two epoch counts: nothing to connect, no rounds figure.
    unrelated = [make_run(tmp_path / "u", "kd-r1", rounds=1, epochs=4),
                 make_run(tmp_path / "u", "kd-r4", rounds=4, epochs=8)]
    written = report(unrelated, tmp_path / "out")
    assert [p.name for p in written] == ["curves.png", "curves.svg", "curves.pdf", "summary.md"]


def test_the_report_command_starts_without_matplotlib():
    code = "import sys, kdcache.cli.report; print(sorted(m for m in sys.modules if m.startswith('matplotlib')))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"
