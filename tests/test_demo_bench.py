"""`kdcache demo` and `kdcache bench` on tiny settings: they run end to end and report real numbers."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from kdcache.bench import MODES, BenchConfig, format_table, run_bench
from kdcache.demo import STUDENTS, DemoPlan, format_summary, run_demo


def test_demo_trains_every_student_from_one_store_and_reuses_the_teacher(digits_dir, tmp_path):
    plan = DemoPlan("test", None, None, "resnet8", "resnet8", teacher_epochs=2, student_epochs=2, batch_size=128,
                    seeds=2)
    lines: list[str] = []
    summary = run_demo(plan, tmp_path, device="cpu", data_dir=digits_dir, echo=lines.append)
    assert [r["run"] for r in summary["students"]] == [name for name, _, _ in STUDENTS]
    assert all(0.0 <= r["test_top1"] <= 100.0 and r["epoch_time_s"] > 0 for r in summary["students"])
    for r in summary["students"]:  # one run dir per seed; the row is their mean and sample std
        finals = [s["test_top1"] for s in r["seeds"]]
        assert [s["seed"] for s in r["seeds"]] == [0, 1] and len({s["run_dir"] for s in r["seeds"]}) == 2
        assert r["test_top1"] == pytest.approx(sum(finals) / 2)
        assert r["test_top1_std"] == pytest.approx(abs(finals[0] - finals[1]) / 2 ** 0.5)
    assert summary["teacher"]["test_top1"] > 10.0
    assert summary["store"]["slabs"] == 2 * plan.student_epochs
    assert summary["crld_cached_vs_online_speedup"] > 0
    assert json.loads((tmp_path / "runs-test" / "summary.json").read_text())["students"] == summary["students"]
    table = format_summary(summary)
    assert "crld-online" in table and table.splitlines()[-2] == summary["reading"]
    assert "cached vs online CRLD" in summary["reading"] and "seed spread" in summary["reading"]
    assert any(line.startswith("[2/4] training teacher") for line in lines)

    lines.clear()
    again = run_demo(replace(plan, seeds=1), tmp_path, device="cpu", data_dir=digits_dir, echo=lines.append)
    assert any(line.startswith("[2/4] reusing teacher") for line in lines)
    assert again["teacher"] == summary["teacher"]
    assert "one seed per student measures no spread" in again["reading"]


def test_bench_measures_every_mode_and_encoding():
    cfg = BenchConfig(teacher="resnet8", student="resnet8", num_classes=20, image_size=16, samples=128,
                      batch_size=32, steps=1, warmup=1, precompute_batch_size=64, device="cpu")
    result = run_bench(cfg, echo=lambda _: None)
    assert [(r["loss"], r["mode"]) for r in result["training"]] == MODES
    assert all(r["steps_per_s"] > 0 for r in result["training"])
    sizes = {e["encoding"]: e["bytes_per_view_sample"] for e in result["encodings"]}
    assert sizes["float16"] == 2 * 20 + 8 and sizes["int8"] < sizes["float16"]
    assert result["precompute"]["plain_inference_images_per_s"] > 0
    assert set(result["ratios"]) >= {"cached_crld_vs_online_crld", "precompute_vs_plain_inference"}
    assert "crld online" in format_table(result)
    assert result["device"].startswith("CPU")


def test_demo_rejects_quick_and_full_together():
    from typer.testing import CliRunner

    from kdcache.cli.app import app
    from kdcache.cli import commands  # noqa: F401

    result = CliRunner().invoke(app, ["demo", "--quick", "--full"])
    assert result.exit_code != 0
    assert isinstance(result.exception, Exception) and "one of --quick and --full" in str(result.exception)


@pytest.mark.parametrize("name", ["quick", "default", "full"])
def test_plans_have_one_round_per_student_epoch(name):
    from kdcache.demo import PLANS

    plan = PLANS[name]
    assert plan.student_epochs >= 1 and plan.teacher_epochs >= 1 and plan.teacher != plan.student
