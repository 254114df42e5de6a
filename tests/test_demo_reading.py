"""The demo's reading line and --seeds: the verdicts follow the numbers, not a script."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from kdcache.demo import PLANS, format_summary, plan_for, reading
from kdcache.errors import KdcacheError


def make_summary(top1: dict[str, tuple[float, float | None]], speedup: float = 1.8) -> dict:
    """A demo summary with the given (mean, std) final top-1 per student and nothing else real."""
    teachers = {"ce": "none", "crld-online": "online"}
    students = [{"run": name, "loss": name.split("-")[0], "teacher": teachers.get(name, "cached"),
                 "test_top1": mean, "test_top1_std": std, "best_top1": mean, "epoch_time_s": 1.0}
                for name, (mean, std) in top1.items()]
    summary = {"plan": {"name": "test", "student": "resnet8", "seeds": 3}, "device": "cpu", "data": "d",
               "teacher": {"model": "resnet20", "test_top1": 88.0},
               "store": {"slabs": 8, "size_on_disk_bytes": 2**20, "bytes_per_view_sample": 28},
               "students": students, "crld_cached_vs_online_speedup": speedup, "total_time_s": 60.0}
    summary["reading"] = reading(summary)
    return summary


def test_a_gain_larger_than_both_spreads_reads_as_beyond_the_spread():
    line = make_summary({"ce": (80.0, 0.3), "kd": (81.0, 0.4), "cmkd": (80.2, 0.5), "crld": (80.9, 0.2),
                         "crld-online": (80.7, 0.3)}, speedup=2.04)["reading"]
    assert line.startswith("reading: cached CRLD 2.04x faster per epoch than online;")
    assert "cached vs online CRLD +0.20 points, within the seed spread (0.50)" in line
    assert "kd, crld beat CE beyond the spread (" in line  # 1.0 > 0.7 and 0.9 > 0.5; cmkd's 0.2 < 0.8 is not
    assert "cmkd +0.20 vs 0.80" in line


def test_gains_inside_the_spread_read_as_noise():
    line = make_summary({"ce": (80.0, 0.6), "kd": (80.5, 0.4), "cmkd": (79.0, 0.5), "crld": (79.6, 0.2),
                         "crld-online": (78.6, 0.3)})["reading"]
    assert "no loss beat CE beyond the spread (" in line
    assert "cached vs online CRLD +1.00 points, beyond the seed spread (0.50)" in line


def test_a_loss_far_below_ce_is_not_reported_as_beating_it():
    line = make_summary({"ce": (80.0, 0.1), "kd": (75.0, 0.1), "cmkd": (74.0, 0.1), "crld": (76.0, 0.1),
                         "crld-online": (76.1, 0.1)})["reading"]
    assert "no loss beat CE beyond the spread, kd, cmkd, crld fell below it" in line and "kd -5.00 vs 0.20" in line


def test_one_seed_gives_no_verdict_on_accuracy():
    summary = make_summary({name: (80.0, None) for name in ("ce", "kd", "cmkd", "crld", "crld-online")})
    summary["plan"]["seeds"] = 1
    assert "one seed per student measures no spread" in summary["reading"]
    assert "beyond" not in summary["reading"] and "within" not in summary["reading"]
    table = format_summary(summary)
    assert table.splitlines()[-2] == summary["reading"] and "±" not in table and "(1 seed)" in table


def test_table_shows_mean_and_std_and_ends_with_the_reading():
    summary = make_summary({"ce": (80.0, 0.25), "kd": (81.0, 0.4), "cmkd": (80.2, 0.5), "crld": (80.9, 0.2),
                            "crld-online": (80.7, 0.3)})
    table = format_summary(summary)
    assert "80.00% ± 0.25" in table and "3 seeds" in table
    assert table.splitlines()[-2] == summary["reading"]


def test_seeds_override_the_plan_and_must_be_positive():
    assert plan_for(False, False).seeds == PLANS["default"].seeds
    assert plan_for(True, False, seeds=2).seeds == 2 and plan_for(True, False, seeds=2).name == "quick"
    with pytest.raises(KdcacheError, match="--seeds must be at least 1"):
        plan_for(False, False, seeds=0)


def test_cli_rejects_zero_seeds_before_doing_anything(tmp_path):
    from kdcache.cli import commands  # noqa: F401
    from kdcache.cli.app import app

    result = CliRunner().invoke(app, ["demo", "--quick", "--seeds", "0", "--workdir", str(tmp_path / "w")])
    assert result.exit_code != 0 and "--seeds must be at least 1" in str(result.exception)
    assert not (tmp_path / "w").exists()
