"""The image deploy/build-image.sh builds, run with podman as deploy/planemesh-daemonset.yaml runs it.

Outside the default tiers (slow, needs the image and podman): selected only with PM_IMAGE_TEST=1, see
docs/operations.md ("The image"). Everything podman is given comes from the DaemonSet manifest: its command and
args, image, capabilities, security context, mounts and env. What the lab replaces: the node's network namespace
is the lab's node namespace (hostNetwork), the ConfigMap is a bootstrap pointing at a planemesh xds-server on a
unix socket in the `run` volume, `/run/planemesh` is a per-test directory and the pin dir carries the run prefix.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from planemesh.agent.admin_client import AdminClient
from planemesh.agent.demo import start_servers
from planemesh.labs import load_lab
from planemesh.labs import netns as ns_tools
from planemesh.labs.traffic import http_requests
from planemesh.model.static_config import default_config_text
from tests.netns.agent_lab import eventually
from tests.netns.test_agent_xds import PASSTHROUGH, resources, start_server, write

pytestmark = [pytest.mark.image, pytest.mark.netns, pytest.mark.bpf]

ROOT = Path(__file__).resolve().parents[2]
DAEMONSET = ROOT / "deploy" / "planemesh-daemonset.yaml"
READY = "planemesh agent ready"
# Linux capability numbers (linux/capability.h) of the names the DaemonSet adds.
CAP_BITS = {"NET_ADMIN": 12, "SYS_PTRACE": 19, "SYS_ADMIN": 21, "PERFMON": 38, "BPF": 39}
FIELD_VALUES = {"spec.nodeName": "lab-node", "status.hostIP": "127.0.0.1", "status.hostIPs": "127.0.0.1",
                "metadata.name": "planemesh-agent-imagetest"}  # fmt: skip


def daemonset() -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(DAEMONSET.read_text()) if d]
    return next(d for d in docs if d["kind"] == "DaemonSet")


def podman_argv(ds: dict[str, Any], *, name: str, netns: str, run_dir: Path, config_dir: Path,
                pin_dir: str) -> list[str]:  # fmt: skip
    """`podman run` with the DaemonSet's container: image, command, args, caps, security context, mounts, env."""
    pod = ds["spec"]["template"]["spec"]
    (ctr,) = pod["containers"]
    sec = ctr["securityContext"]
    argv = ["run", "--rm", "--name", name, "--user", str(sec["runAsUser"])]
    if pod.get("hostNetwork"):
        argv += ["--network", f"ns:/run/netns/{netns}"]  # the lab's node namespace plays the node's
    if pod.get("hostPID"):
        argv += ["--pid", "host"]
    assert not sec.get("privileged")
    argv += [f"--cap-drop={c}" for c in sec["capabilities"]["drop"]]
    argv += [f"--cap-add={c}" for c in sec["capabilities"]["add"]]
    if sec.get("readOnlyRootFilesystem"):
        argv.append("--read-only")
    if sec.get("allowPrivilegeEscalation") is False:
        argv += ["--security-opt", "no-new-privileges"]
    if sec.get("appArmorProfile", {}).get("type") == "Unconfined":
        argv += ["--security-opt", "apparmor=unconfined"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    for mount in ctr["volumeMounts"]:
        vol, path = volumes[mount["name"]], mount["mountPath"]
        if "emptyDir" in vol:
            argv += ["--tmpfs", f"{path}:size={vol['emptyDir'].get('sizeLimit', '64Mi').replace('Mi', 'm')}"]
            continue
        if "configMap" in vol:
            source = str(config_dir)
        else:
            source = vol["hostPath"]["path"]
            source = str(run_dir) if source == "/run/planemesh" else source  # a private admin socket directory
        options = ["ro"] if mount.get("readOnly") else []
        if mount.get("mountPropagation") == "HostToContainer":
            options.append("rslave")
        argv += ["-v", f"{source}:{path}" + (f":{','.join(options)}" if options else "")]
    for env in ctr.get("env", []):
        value = env["value"] if "value" in env else FIELD_VALUES[env["valueFrom"]["fieldRef"]["fieldPath"]]
        argv += ["--env", f"{env['name']}={value}"]
    args = [f"--pin-dir={pin_dir}" if a.startswith("--pin-dir=") else a for a in ctr["args"]]
    return [*argv, ctr["image"], *ctr["command"], *args]


def podman_runtime() -> list[str]:
    """crun refuses hybrid cgroup hierarchies (v1 controllers + a cgroup2 mount); runc runs there."""
    hybrid = Path("/sys/fs/cgroup/unified").is_dir() and not Path("/sys/fs/cgroup/cgroup.controllers").exists()
    return ["--runtime", "runc"] if hybrid and shutil.which("runc") else []


def ulimits() -> list[str]:
    """podman asks for RLIMIT_NOFILE 1048576 and RLIMIT_NPROC 4194304 by default; where our hard limits are lower
    the runtime's setrlimit fails (EPERM). Ask for what we have (nproc: not above pid_max, which the kernel here
    also enforces)."""
    import resource

    def hard(limit: int, cap: int) -> int:
        value = resource.getrlimit(limit)[1]
        return cap if value == resource.RLIM_INFINITY else min(value, cap)

    nofile = hard(resource.RLIMIT_NOFILE, 1 << 20)
    nproc = hard(resource.RLIMIT_NPROC, int(Path("/proc/sys/kernel/pid_max").read_text()))
    return ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", f"nproc={nproc}:{nproc}"]


def cap_eff(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no CapEff for {pid}")


def agent_pid(name: str) -> int:
    out = subprocess.run(["podman", "inspect", "--format", "{{.State.Pid}}", name], capture_output=True, text=True)
    return int(out.stdout.strip() or 0)


def test_image_runs_as_the_daemonset_says(run_prefix: str) -> None:
    if shutil.which("podman") is None:
        pytest.fail("needs podman (apt-get install podman runc)")
    ds = daemonset()
    image = ds["spec"]["template"]["spec"]["containers"][0]["image"]
    if subprocess.run(["podman", "image", "exists", image]).returncode != 0:
        pytest.fail(f"image {image} not built: run deploy/build-image.sh")
    name = f"{run_prefix}-image"
    pin_dir = f"/sys/fs/bpf/{run_prefix}-image"
    lab = load_lab(prefix=f"{run_prefix}i")
    with tempfile.TemporaryDirectory(prefix="planemesh-image-") as tmp, lab:
        work = Path(tmp)
        run_dir, config_dir, res = work / "run", work / "config", work / "resources"
        for d in (run_dir, config_dir, res):
            d.mkdir()
        write(res / "config.yaml", resources(PASSTHROUGH))
        planes = yaml.safe_load(default_config_text())["planes"]
        bootstrap = {"node": {"id": "lab-node"}, "server": {"address": "unix:///run/planemesh/xds.sock"},
                     "timing": {"backoff_base_s": 0.1, "backoff_max_s": 0.5}, "planes": planes}  # fmt: skip
        (config_dir / "bootstrap.yaml").write_text(yaml.safe_dump(bootstrap))
        xds = start_server(res, run_dir / "xds.sock")
        servers = start_servers(lab)
        argv = ["podman", *podman_runtime(), *podman_argv(ds, name=name, netns=lab.node_ns, run_dir=run_dir,
                                                         config_dir=config_dir, pin_dir=pin_dir)]  # fmt: skip
        argv[argv.index("run") + 1 : argv.index("run") + 1] = ulimits()
        agent = None
        try:
            agent = ns_tools.start_until(None, argv, READY, timeout=240)
            admin = AdminClient(f"unix://{run_dir / 'admin.sock'}")
            assert eventually(lambda: admin.get("/ready").status == 200, timeout=30)

            # Proxied through the container's workers, intercepted by the programs it loaded.
            r = http_requests(lab.pod_ns("client"), lab.pod_addr("server", "oam", 4), 80, ["/"])
            assert r.status == [200] and "x-request-id" in r.seen(0)["headers"]
            status = subprocess.run(
                [sys.executable, "-m", "planemesh.agent.cli", "status", "--admin", f"unix://{run_dir}/admin.sock"],
                capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            assert status.returncode == 0, status.stdout + status.stderr
            assert "xds        connected" in status.stdout

            # The agent holds exactly the DaemonSet's capabilities, and no compiler (bcc ran in its helper).
            pid = agent_pid(name)
            wanted = ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"]
            assert cap_eff(pid) == sum(1 << CAP_BITS[c] for c in wanted)
            rss = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("VmRSS"))
            print(f"agent in the image, pid {pid}: {rss}")
            maps = Path(f"/proc/{pid}/maps").read_text()
            assert "libLLVM" not in maps and "libbcc" not in maps
            def routes() -> list:  # the workers' rows come with the agent's next poll of its workers
                return json.loads(admin.get("/stats?format=json").body)["routes"]

            assert eventually(lambda: any(row["plane"] == "oam" for row in routes()), timeout=15), routes()
        finally:
            code = ns_tools.stop(agent, timeout=40) if agent is not None else None
            subprocess.run(["podman", "rm", "-f", "--ignore", name], capture_output=True)
            for proc in [*servers, xds]:
                ns_tools.stop(proc)
            leftover = os.path.isdir(pin_dir)
            shutil.rmtree(pin_dir, ignore_errors=True)
        # SIGTERM to podman reaches the agent: it drains, detaches, removes its pins and exits 0.
        assert code == 0, "\n".join(getattr(agent, "output_lines", [])[-30:])
        assert not leftover, "a clean stop removes the pins"
