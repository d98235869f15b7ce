"""The documentation site builds with warnings as errors (mkdocs.yml says strict), and its
API reference has what the docstrings say."""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_the_docs_build_strictly(tmp_path: pathlib.Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reference = (tmp_path / "reference" / "index.html").read_text()
    for name in ("set_compression", "wait_for_state_change", "run_sync", "register_encoding"):
        assert name in reference, name
    assert (tmp_path / "tutorial" / "index.html").exists()
