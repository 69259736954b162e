"""The podman command line the image test derives from deploy/planemesh-daemonset.yaml (the image test itself is
outside the default tiers; this keeps its reading of the manifest checked on every run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.image.test_image_daemonset import daemonset, podman_argv

pytestmark = pytest.mark.unit


def test_podman_argv_carries_the_daemonsets_container() -> None:
    argv = podman_argv(daemonset(), name="t", netns="pm-node", run_dir=Path("/tmp/r"), config_dir=Path("/tmp/c"),
                       pin_dir="/sys/fs/bpf/t")  # fmt: skip
    text = " ".join(argv)
    assert "--network ns:/run/netns/pm-node" in text and "--pid host" in text and "--read-only" in text
    assert "--cap-drop=ALL" in argv
    assert {a.split("=", 1)[1] for a in argv if a.startswith("--cap-add=")} == {
        "BPF", "NET_ADMIN", "PERFMON", "SYS_ADMIN", "SYS_PTRACE"}  # fmt: skip
    assert "no-new-privileges" in argv
    mounts = {argv[i + 1] for i, a in enumerate(argv) if a == "-v"}
    assert "/tmp/c:/etc/planemesh:ro" in mounts and "/tmp/r:/run/planemesh" in mounts
    assert "/sys/fs/bpf:/sys/fs/bpf:rslave" in mounts and "/proc:/host/proc:ro" in mounts
    assert "/lib/modules:/lib/modules:ro" in mounts and "/usr/src:/usr/src:ro" in mounts
    assert "/tmp:size=64m" in argv
    image = argv.index("localhost/planemesh:0.1.0")
    assert argv[image + 1 : image + 3] == ["planemesh", "agent"]
    assert "--pin-dir=/sys/fs/bpf/t" in argv[image:] and "--bootstrap=/etc/planemesh/bootstrap.yaml" in argv[image:]
    assert "PLANEMESH_HOST_PROC=/host/proc" in argv


def test_daemonset_runs_the_image_build_image_sh_tags() -> None:
    import tomllib

    root = Path(__file__).resolve().parents[2]
    version = tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"]
    assert 'tag=${PLANEMESH_IMAGE:-localhost/planemesh:$version}' in (root / "deploy" / "build-image.sh").read_text()
    assert daemonset()["spec"]["template"]["spec"]["containers"][0]["image"] == f"localhost/planemesh:{version}"
