"""``--env-file``: a .env file's variables in the process's environment, as uvicorn's is."""

from __future__ import annotations

import os

__all__ = ["environment_for_children", "load_env_file"]

# The names load_env_file() put into os.environ (not those already set).
_loaded: set[str] = set()


def load_env_file(path: str) -> None:
    """Put the file's variables into the environment, before the App is imported: code that
    reads ``os.environ`` sees them. A variable already set wins, in whatever case either
    spells its name, as it does for the settings (which read names in any case); the file is
    parsed as pydantic-settings parses one, by python-dotenv."""
    from dotenv import dotenv_values

    present = {name.lower() for name in os.environ}
    for name, value in dotenv_values(path).items():
        if value is not None and name.lower() not in present:  # (a bare ``NAME`` line: no value)
            os.environ[name] = value
            present.add(name.lower())
            _loaded.add(name)


def environment_for_children() -> dict[str, str]:
    """The environment for a ``--workers`` or ``--reload`` child: without what
    :func:`load_env_file` added, since the child, given the same ``--env-file``, reads the
    file itself (afresh: a restarted child sees the file as it is now)."""
    return {name: value for name, value in os.environ.items() if name not in _loaded}
