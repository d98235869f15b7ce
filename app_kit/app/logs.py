"""Logging for ``python -m app_kit run`` that stays the user's.

The rules, as uvicorn users expect them:

- a logging configuration the user made (handlers on the root logger, set up when their module
  was imported) is left alone, and so is ``--log-config FILE`` (``logging.config.dictConfig``
  in JSON, or YAML with the ``yaml`` extra);
- only when nothing is configured does the CLI add one stderr handler: text lines, or one JSON
  object per line with ``APP_LOG_FORMAT=json``;
- a level given (``--log-level``, ``--debug``, ``APP_LOG_LEVEL``) applies to app_kit's own
  loggers only (the ``app_kit`` logger). The root logger, and so the user's loggers and
  third-party ones, stays as configured, INFO when the CLI adds its handler: DEBUG never
  reaches hpack or h2, whose debug lines carry every header value (``authorization``
  included), and ERROR does not silence the app's own warnings. (A root logger the user
  sets to DEBUG does not reach hpack either: see app_kit.wire.h2_internals.)
"""

from __future__ import annotations

import datetime
import json
import logging
import logging.config
import os
import pathlib
import sys
from typing import Any

__all__ = ["JSONFormatter", "configure_logging", "load_log_config", "report_early"]

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
# The attributes every LogRecord has: what is left on a record are the caller's ``extra`` fields.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JSONFormatter(logging.Formatter):
    """One JSON object per record: ``time``, ``level``, ``logger``, ``message``, the record's
    ``extra`` fields (the access log's ``grpc_method``, ``duration_ms``...), ``exception``."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        entry: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        try:
            return json.dumps(entry, default=str, ensure_ascii=False)
        except (TypeError, ValueError):  # an extra JSON cannot hold (a dict with tuple keys...)
            return json.dumps({key: value if isinstance(value, str) else repr(value) for key, value in entry.items()})


def load_log_config(path: str) -> dict[str, Any]:
    """Read a ``dictConfig`` dictionary from a JSON file, or YAML (``.yaml``/``.yml``)."""
    text = pathlib.Path(path).read_text()
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"{path}: a YAML logging configuration needs 'app_kit[yaml]' (PyYAML)") from None
        config = yaml.safe_load(text)
    else:
        try:
            config = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not JSON ({exc}); YAML files must end in .yaml or .yml") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: a logging configuration is a mapping (logging.config.dictConfig)")
    # app_kit's loggers exist by now: dictConfig's default would silence every one of them.
    config.setdefault("disable_existing_loggers", False)
    return config


def configure_logging(level: str | None, *, log_format: str = "text", config_file: str | None = None) -> None:
    """Set up logging for the CLI, leaving the user's configuration alone (see the module).

    ``level`` None: app_kit's loggers keep what is configured (INFO when nothing is).
    Raises :class:`ValueError` for a configuration file that cannot be used.
    """
    if config_file is not None:
        try:
            logging.config.dictConfig(load_log_config(config_file))
        except (OSError, ValueError, TypeError, AttributeError, ImportError) as exc:
            raise ValueError(f"--log-config {config_file}: {exc}") from None
    root = logging.getLogger()
    if config_file is None and not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JSONFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
        root.addHandler(handler)
        root.setLevel(logging.INFO)  # whatever the level given: that one is app_kit's alone
        if level is None:
            level = "INFO"
    if level is not None:
        logging.getLogger("app_kit").setLevel(level)


def report_early(message: str) -> None:
    """A start-up error said before logging is set up (settings that do not load, an app
    that does not import): one line on stderr, a JSON object like every other line when
    ``APP_LOG_FORMAT=json`` asks for them (a log pipeline would choke on plain text)."""
    if os.environ.get("APP_LOG_FORMAT", "").strip().lower() == "json":
        record = logging.LogRecord("app_kit", logging.ERROR, __file__, 0, message, None, None)
        line = JSONFormatter().format(record)
    else:
        line = f"app_kit: {message}"
    print(line, file=sys.stderr)
