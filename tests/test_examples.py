"""The examples run as a user runs them, on the session's digits data and store."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import REPO


def test_train_from_store_learns_from_the_teachers_logits(digits_dir, weak_store):
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "train_from_store.py"), "--data", str(digits_dir),
         "--store", str(weak_store), "--epochs", "4"],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    epochs = re.findall(r"epoch (\d+) round (\d+) train_loss ([\d.]+) test_top1 ([\d.]+)", result.stdout)
    assert [(int(e), int(r)) for e, r, _, _ in epochs] == [(1, 0), (2, 0), (3, 0), (4, 0)]  # 1-round store
    losses = [float(loss) for _, _, loss, _ in epochs]
    assert losses[-1] < 0.5 * losses[0], result.stdout
    assert float(epochs[-1][3]) > 40.0, result.stdout  # 10 classes: chance is 10%
