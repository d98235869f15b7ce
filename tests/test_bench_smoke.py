"""The benchmark stays runnable: its --smoke mode drives app_kit through the whole pipeline."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_bench_smoke(tmp_path: pathlib.Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "results.json").read_text())
    unary = report["scenarios"]["grpcio unary 1 in flight"]
    assert unary["median"]["app_kit"] > 0  # served, verified and counted by the gates
