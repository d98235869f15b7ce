"""A user's app module passes ``mypy --strict``: App's decorators are typed and keep the decorated
function's type, so mypy reports no "untyped decorator" and still sees the user's mistakes.

mypy runs on the module as a user's project would: app_kit installed (a virtual environment whose
site-packages points at this checkout), so only the user's module is checked, strictly.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

GOOD = """
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Annotated

from pydantic import Field

from app_kit import App, AppSettings, Handler, RunningApp, StartupAborted


class Settings(AppSettings):
    dsn: str = Field(default="sqlite://", validation_alias="MY_DSN")


class Pool:
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    async def ping(self) -> bool:
        return True


class Echo:
    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    def __mapping__(self) -> dict[str, Handler]:
        return {}


app = App(Settings, name="strict")


@app.resource(health_check=Pool.ping)
async def pool(settings: Settings) -> AsyncIterator[Pool]:
    yield Pool(settings.dsn)


@app.resource
async def replica(settings: Settings) -> AsyncIterator[Annotated[Pool, "replica"]]:
    yield Pool(settings.dsn + "?replica")


@app.resource
@contextlib.asynccontextmanager
async def standby(primary: Pool) -> AsyncIterator[Annotated[Pool, "standby"]]:
    yield Pool(primary.dsn + "?standby")


@app.service
def echo(pool: Pool, replica: Annotated[Pool, "replica"]) -> Echo:
    return Echo(pool)


@app.service
async def later(pool: Pool) -> Echo:
    return Echo(pool)


# The decorated functions keep their types: these are checked, not Any.
made: AsyncIterator[Pool] = pool(Settings())
entered: contextlib.AbstractAsyncContextManager[Pool] = standby(Pool("x"))
built: Echo = echo(Pool("a"), Pool("b"))


async def main() -> None:
    stop = asyncio.Event()
    try:
        async with app.serve(Settings(), stop=stop) as running:
            typed: RunningApp[Settings] = running
            chosen: Pool = typed.resource(Pool, "replica")
            print(chosen.dsn, typed.settings.dsn)
    except StartupAborted:
        pass
"""

BAD = """
from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

from app_kit import App, AppSettings


class Pool:
    def ping(self) -> bool:
        return True


class NotAService:
    pass


app = App(AppSettings)


@app.resource  # expect type-var: a plain generator is not a resource
def pool(settings: AppSettings) -> Iterator[Pool]:
    yield Pool()


@app.service  # expect type-var: what it returns has no __mapping__
def service(settings: AppSettings) -> NotAService:
    return NotAService()


@app.resource(health_check=Pool.ping)  # expect arg-type: the check must be async
async def checked(settings: AppSettings) -> AsyncIterator[Pool]:
    yield Pool()


checked(1)  # expect arg-type: the decorated function kept its parameters
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtual environment in which app_kit is installed (from this checkout), for mypy to read."""
    env = tmp_path_factory.mktemp("venv")
    venv.create(env, system_site_packages=True, with_pip=False, symlinks=True)
    [site_packages] = env.glob("lib/python3*/site-packages")
    (site_packages / "app_kit_checkout.pth").write_text(f"{ROOT}\n")
    return env / "bin" / "python"


def strict_mypy(python: Path, source: str, directory: Path) -> subprocess.CompletedProcess[str]:
    (directory / "user_app.py").write_text(textwrap.dedent(source).lstrip())
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--python-executable", str(python), "user_app.py"],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_user_module_is_strict_clean(installed: Path, tmp_path: Path) -> None:
    result = strict_mypy(installed, GOOD, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "Success: no issues found in 1 source file", result.stdout


def test_strict_mypy_still_reports_wrong_uses(installed: Path, tmp_path: Path) -> None:
    result = strict_mypy(installed, BAD, tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    errors = {
        (int(match["line"]), match["code"])
        for match in re.finditer(r"^user_app\.py:(?P<line>\d+): error: .*\[(?P<code>[\w-]+)\]$", result.stdout, re.M)
    }
    expected = {
        (number, match[1])
        for number, line in enumerate(textwrap.dedent(BAD).lstrip().splitlines(), start=1)
        if (match := re.search(r"# expect ([\w-]+):", line))
    }
    assert len(expected) == 4
    assert errors == expected, result.stdout
    assert "untyped-decorator" not in result.stdout and "Untyped decorator" not in result.stdout
