"""Logging set-up: `--log-format text|json`, `--log-level`, each also an environment variable.

Text under systemd (JOURNAL_STREAM set) drops the timestamp, which journald adds, and prefixes the
syslog priority (`<3>`) so `journalctl -p err` works. JSON is one object per line, for log shippers:
{"ts", "level", "logger", "msg", ...extra fields passed with `extra=`, "exc" when there is one}.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

LEVEL_ENV = "PLANEMESH_LOG_LEVEL"
FORMAT_ENV = "PLANEMESH_LOG_FORMAT"
FORMATS = ("text", "json")
LEVELS = ("debug", "info", "warning", "error", "critical")

_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
_SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class JournalFormatter(logging.Formatter):
    """`<prio>logger: message`: journald parses the prefix into PRIORITY and timestamps itself."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        prio = _SYSLOG_PRIORITY.get(record.levelno, 6)
        return "\n".join(f"<{prio}>{line}" for line in text.splitlines())


class LoggingConfigError(ValueError):
    pass


def configure_logging(
    level: str | None = None,
    fmt: str | None = None,
    stream: TextIO | None = None,
    env: Mapping[str, str] | None = None,
) -> logging.Handler:
    """Configure the root logger (flag beats environment beats default info/text); returns the handler."""
    env = os.environ if env is None else env
    level_name = (level or env.get(LEVEL_ENV) or "info").lower()
    fmt_name = (fmt or env.get(FORMAT_ENV) or "text").lower()
    if level_name not in LEVELS:
        raise LoggingConfigError(f"log level {level_name!r} is not one of {', '.join(LEVELS)}")
    if fmt_name not in FORMATS:
        raise LoggingConfigError(f"log format {fmt_name!r} is not one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler(stream or sys.stderr)
    if fmt_name == "json":
        handler.setFormatter(JsonFormatter())
    elif env.get("JOURNAL_STREAM"):
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level_name.upper())
    return handler


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", choices=LEVELS, default=None, help=f"default info (env {LEVEL_ENV})")
    parser.add_argument("--log-format", choices=FORMATS, default=None, help=f"default text (env {FORMAT_ENV})")


def configure_from_args(args: argparse.Namespace) -> logging.Handler:
    return configure_logging(getattr(args, "log_level", None), getattr(args, "log_format", None))
