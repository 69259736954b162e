"""Logging set-up: flags beat environment beats defaults; JSON lines; journald priorities."""

from __future__ import annotations

import io
import json
import logging

import pytest

from planemesh.agent.logs import LoggingConfigError, configure_logging


@pytest.fixture(autouse=True)
def restore_root_logger():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_carry_extra_fields_and_exceptions():
    out = io.StringIO()
    configure_logging("debug", "json", stream=out, env={})
    log = logging.getLogger("planemesh.test")
    log.info("plane %s up", "oam", extra={"plane": "oam", "ifindex": 7})
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("failed")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["msg"] == "plane oam up" and first["level"] == "info" and first["logger"] == "planemesh.test"
    assert first["plane"] == "oam" and first["ifindex"] == 7 and first["ts"].endswith("Z")
    assert second["level"] == "error" and "RuntimeError: boom" in second["exc"]


@pytest.mark.parametrize(
    ("flag_level", "flag_format", "env", "expected_level", "json_output"),
    [
        (None, None, {}, logging.INFO, False),
        (None, None, {"PLANEMESH_LOG_LEVEL": "debug", "PLANEMESH_LOG_FORMAT": "json"}, logging.DEBUG, True),
        ("warning", "text", {"PLANEMESH_LOG_LEVEL": "debug", "PLANEMESH_LOG_FORMAT": "json"}, logging.WARNING, False),
    ],
)
def test_flag_beats_environment_beats_default(flag_level, flag_format, env, expected_level, json_output):
    out = io.StringIO()
    configure_logging(flag_level, flag_format, stream=out, env=env)
    assert logging.getLogger().level == expected_level
    logging.getLogger("x").warning("hello")
    line = out.getvalue().strip()
    assert line.startswith("{") == json_output and "hello" in line


def test_journald_gets_priorities_and_no_timestamp():
    out = io.StringIO()
    configure_logging("info", "text", stream=out, env={"JOURNAL_STREAM": "8:1234"})
    logging.getLogger("planemesh.agent").error("lost plane\nsecond line")
    assert out.getvalue() == "<3>planemesh.agent: lost plane\n<3>second line\n"


@pytest.mark.parametrize(("level", "fmt"), [("loud", "text"), ("info", "xml")])
def test_bad_values_are_clear_errors(level, fmt):
    with pytest.raises(LoggingConfigError, match="is not one of"):
        configure_logging(level, fmt, stream=io.StringIO(), env={})
