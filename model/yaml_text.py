"""YAML text to Python data (PyYAML's safe_load) without PyYAML in a process that has not loaded it already.

PyYAML and libyaml cost the long-lived agent ~1.5 MB of RSS that stays after its one parse at start (removing the
modules gives none of it back: docs/benchmarks.md, lean5). So a process without `yaml` in sys.modules (the agent)
parses in a short-lived child, `python -m planemesh.model.yaml_text`, which reads the text on stdin and writes
the result pickled (safe_load's types: dicts, lists, str, numbers, dates, bytes, sets) or the parser's error. A
process that has yaml anyway (tools, labs, tests) parses in place: same result. The last few texts' results are
kept (the agent reads its configuration file for several sections at start and on SIGHUP: one child per text).
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

from planemesh import cpickle as pickle
from planemesh import module_argv

CHILD_TIMEOUT_S = 60.0
_CACHED = 4
_cache: dict[str, bytes] = {}  # text -> pickled ("ok", data) or ("error", message)


class YamlError(ValueError):
    """The text is not valid YAML; the message is PyYAML's."""


def safe_load(text: str) -> Any:
    """yaml.safe_load(text), a fresh object on each call; YamlError with PyYAML's message when it is invalid."""
    result = _cache.get(text)
    if result is None:
        result = _parse_here(text) if "yaml" in sys.modules else _parse_in_child(text)
        while len(_cache) >= _CACHED:
            del _cache[next(iter(_cache))]
        _cache[text] = result
    kind, value = pickle.loads(result)
    if kind == "error":
        raise YamlError(value)
    return value


def _parse_here(text: str) -> bytes:
    import yaml  # loaded already (safe_load), or this is the child


    try:
        return pickle.dumps(("ok", yaml.safe_load(text)))
    except yaml.YAMLError as exc:
        return pickle.dumps(("error", str(exc)))


def _parse_in_child(text: str) -> bytes:
    try:
        out = subprocess.run(
            module_argv("planemesh.model.yaml_text"), input=text.encode(), capture_output=True, timeout=CHILD_TIMEOUT_S
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise YamlError(f"the YAML parser process failed: {exc}") from exc
    if out.returncode != 0:
        err = " ".join(out.stderr.decode(errors="replace").split()[-30:])
        raise YamlError(f"the YAML parser process failed (exit {out.returncode}): {err}")
    return out.stdout


def main() -> None:
    """The child: stdin's text parsed, the pickled outcome on stdout."""
    sys.stdout.buffer.write(_parse_here(sys.stdin.buffer.read().decode()))


if __name__ == "__main__":
    main()
