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


def test_floods_smoke() -> None:
    # Two of the flood attacks, small, against app_kit only: the flood bench stays runnable.
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "floods.py"), "--quick", "--impl", "app_kit", "--only", "PING,SETTINGS"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| PING x ")]
    assert len(rows) == 1, result.stdout + result.stderr
    cells = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert cells[1] == "app_kit" and "GOAWAY ENHANCE_YOUR_CALM" in cells[3], rows[0]
    assert cells[4].startswith("yes"), rows[0]  # others served after the flood
