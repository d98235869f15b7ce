"""Run ``python -m app_kit run ...`` as a real process and watch its log."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_app_cli(target: str, cwd: Any) -> subprocess.CompletedProcess[str]:
    """``python -m app_kit run target`` from ``cwd`` (app_kit importable from this checkout),
    run to its end: its exit code and output (for start-up failures)."""
    return subprocess.run(
        [sys.executable, "-m", "app_kit", "run", target],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": ROOT},
        capture_output=True,
        text=True,
        timeout=30,
    )


class AppProcess:
    def __init__(self, *args: str, env: dict[str, str] | None = None, cwd: str = ROOT) -> None:
        self.args = args
        self.cwd = cwd
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.lines: list[str] = []
        self.port: int | None = None
        self._ready = asyncio.Event()

    async def __aenter__(self) -> AppProcess:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "app_kit",
            "run",
            *self.args,
            cwd=self.cwd,
            env=self.env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        await self._reader

    async def _read(self) -> None:
        assert self.process.stderr is not None
        while line := await self.process.stderr.readline():
            text = line.decode(errors="replace").rstrip()
            self.lines.append(text)
            match = re.search(r" serving .* on (?:127\.0\.0\.1|\[::1\]|localhost):(\d+)", text)
            if match:
                self.port = int(match.group(1))
                self._ready.set()
        self._ready.set()

    async def ready(self, timeout: float = 15) -> int:
        await asyncio.wait_for(self._ready.wait(), timeout)
        assert self.port is not None, "\n".join(self.lines)
        return self.port

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.process.send_signal(signum)

    async def wait(self, timeout: float = 15) -> int:
        return await asyncio.wait_for(self.process.wait(), timeout)

    @property
    def log(self) -> str:
        return "\n".join(self.lines)
