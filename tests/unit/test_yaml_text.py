"""YAML parsed in a short-lived child by a process that has not loaded PyYAML (the agent: ~1.5 MB of RSS less,
model/yaml_text.py): the same data and the same errors as PyYAML in place, and the agent never loads it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from planemesh.model import yaml_text
from planemesh.model.static_config import default_config_text

DOCUMENT = """\
planes: [{name: oam, id: 1, cidrs: [198.18.1.0/24]}]
when: 2026-12-06
at: 2026-12-06 14:40:00
blob: !!binary aGVsbG8=
set: !!set {a, b}
nums: [1, 0x10, 1.5, .inf, ~, yes, "yes"]
1: int key
"""
BAD = "a: [1, 2\nb: 3\n"


@pytest.mark.parametrize("text", [DOCUMENT, default_config_text(), "", "- 1\n- [2]\n"])
def test_the_child_returns_what_pyyaml_returns_in_place(text: str) -> None:
    yaml_text._cache.clear()
    assert yaml_text.pickle.loads(yaml_text._parse_in_child(text)) == ("ok", yaml.safe_load(text))


def test_the_child_reports_pyyamls_own_error() -> None:
    with pytest.raises(yaml.YAMLError) as direct:
        yaml.safe_load(BAD)
    assert yaml_text.pickle.loads(yaml_text._parse_in_child(BAD)) == ("error", str(direct.value))


def test_each_call_gets_its_own_object_and_a_cached_error_is_raised_again() -> None:
    first, second = yaml_text.safe_load(DOCUMENT), yaml_text.safe_load(DOCUMENT)
    assert first == second and first is not second
    for _ in range(2):
        with pytest.raises(yaml_text.YamlError, match="expected ',' or ']'"):
            yaml_text.safe_load(BAD)


def test_the_agent_reads_its_configuration_without_loading_pyyaml(tmp_path: Path) -> None:
    """Its start-up modules, the embedded default and a --config file: the YAML is parsed by the child."""
    code = (
        "import sys\nimport planemesh.agent.cli, planemesh.agent.daemon\n"
        "from planemesh.model.static_config import load_default_config, load_static_snapshot\n"
        "assert load_default_config().planes == load_static_snapshot(sys.argv[1]).planes\n"
        "print(' '.join(m for m in sys.modules if m.split('.')[0] in ('yaml', '_yaml')))"
    )
    config = tmp_path / "config.yaml"
    config.write_text(default_config_text())
    out = subprocess.run([sys.executable, "-P", "-c", code, str(config)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == []


def test_a_child_that_cannot_run_is_a_clear_yaml_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(yaml_text, "module_argv", lambda module: [sys.executable, "-c", "raise SystemExit(3)"])
    with pytest.raises(yaml_text.YamlError, match=r"parser process failed \(exit 3\)"):
        yaml_text._parse_in_child("a: 1\n")
