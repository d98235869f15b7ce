"""docs/tutorial.md, followed as written: its files, its protoc command, its App run by the CLI
from the directory the tutorial works in, and its client, which must print the greeting."""

from __future__ import annotations

import asyncio
import os
import pathlib
import re
import signal
import subprocess
import sys

import pytest

from .process import ROOT, AppProcess

pytestmark = pytest.mark.anyio

TUTORIAL = pathlib.Path(ROOT, "docs", "tutorial.md").read_text()


def _block_after(marker: str, language: str) -> str:
    """The first ``language`` code block after ``marker`` in the tutorial."""
    start = TUTORIAL.index(marker)
    match = re.compile(rf"```{language}\n(.*?)```", re.DOTALL).search(TUTORIAL, start)
    assert match is not None, marker
    return match.group(1)


async def test_the_tutorial_runs_as_written(tmp_path: pathlib.Path) -> None:
    for name, language in (("greeter/greeter.proto", "proto"), ("greeter/service.py", "python")):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(_block_after(f"`{name}`:", language))
    (tmp_path / "greeter/app.py").write_text(_block_after("`greeter/app.py`:", "python"))
    generate = _block_after("with protoc and app_kit's plugin", "sh").strip()
    assert generate.startswith("python3 -m grpc_tools.protoc")
    env = {**os.environ, "PYTHONPATH": ROOT}
    subprocess.run([sys.executable, *generate.split()[1:]], cwd=tmp_path, env=env, check=True, timeout=60)
    run = _block_after("Run it:", "sh").strip()
    assert run == "python3 -m app_kit run greeter.app:app --port 50051"
    async with AppProcess("greeter.app:app", "--port", "0", env=env, cwd=str(tmp_path)) as app:
        port = await app.ready()
        client = _block_after("## 4. Call it", "python").replace("127.0.0.1:50051", f"127.0.0.1:{port}")
        (tmp_path / "client.py").write_text(client)
        called = await asyncio.create_subprocess_exec(
            sys.executable, "client.py", cwd=tmp_path, env=env, stdout=asyncio.subprocess.PIPE
        )
        out, _ = await asyncio.wait_for(called.communicate(), 30)
        assert out.decode().strip() == "Hello, Ann!"
        app.signal(signal.SIGTERM)
        assert await app.wait() == 0
    # The image: the code is copied where the CLI, run from WORKDIR, imports it.
    dockerfile = _block_after("## 5. Ship it", "dockerfile")
    assert "COPY greeter/ greeter/" in dockerfile and "WORKDIR /srv" in dockerfile
    assert 'CMD ["python", "-m", "app_kit", "run", "greeter.app:app"]' in dockerfile
