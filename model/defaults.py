"""Every command-line flag of `planemesh`, its environment variable and its default: the one table.

The commands' parsers take their defaults and help from here (`option()`), docs/configuration.md is generated
from it (scripts/gen_configuration_doc.py), and tests/unit/test_configuration.py checks that every flag of
every parser is here with the same default and that its environment variable is really read.

Precedence, everywhere: the flag, else the environment variable, else the default. A repeatable flag's
variable holds a comma-separated list. A switch's variable is on when it is "1", "true" or "yes".
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class Kind(StrEnum):
    VALUE = "value"
    SWITCH = "switch"  # store_true
    LIST = "list"  # repeatable (action="append"); the variable: comma-separated


@dataclass(frozen=True)
class Setting:
    commands: tuple[str, ...]  # the `planemesh` subcommands that take it ("ca init": a verb of `ca`)
    flag: str | None  # None: environment only
    env: str | None  # None: flag only
    default: str | None  # as it would be written on the command line; None: unset
    doc: str
    kind: Kind = Kind.VALUE
    shown_default: str = ""  # for the docs when `default` is not the whole story

    def raw(self, environ: Mapping[str, str] | None = None) -> str | None:
        environ = os.environ if environ is None else environ
        if self.env is not None and environ.get(self.env, "") != "":
            return environ[self.env]
        return self.default

    def switch(self, environ: Mapping[str, str] | None = None) -> bool:
        return (self.raw(environ) or "").strip().lower() in ("1", "true", "yes")

    def values(self, given: list[str] | None, environ: Mapping[str, str] | None = None) -> list[str]:
        """A repeatable flag's values: those given, else the variable's (comma-separated), else the default's."""
        if given:
            return list(given)
        return [v.strip() for v in (self.raw(environ) or "").split(",") if v.strip()]

    def help(self) -> str:
        where = [f"env {self.env}"] if self.env else []
        default = self.shown_default or self.default
        if default is not None and self.kind is not Kind.SWITCH:
            where.append(f"default {default}")
        return f"{self.doc} [{'; '.join(where)}]" if where else self.doc


AGENT = ("agent",)
ADMIN_CLIENTS = ("status", "planes", "stats", "config-dump", "top")
ADMIN_SOCKET = "unix:///run/planemesh/admin.sock"

SETTINGS: tuple[Setting, ...] = (
    # ---- planemesh agent ----------------------------------------------------------------------------
    Setting(AGENT, "--config", "PLANEMESH_CONFIG", None,
            "static YAML configuration (docs/planes.md); neither this nor --bootstrap: the embedded default",
            shown_default="model/default-config.yaml (embedded)"),
    Setting(AGENT, "--bootstrap", "PLANEMESH_BOOTSTRAP", None,
            "xDS bootstrap YAML (docs/xds.md): configuration comes from the control plane it names"),
    Setting(AGENT, "--xds", "PLANEMESH_XDS", None, "xDS server, host:port or unix:///path: overrides the bootstrap's"),
    Setting(AGENT, "--xds-resources", "PLANEMESH_XDS_RESOURCES", None,
            "serve this directory of Envoy resources from an embedded xDS server and follow it"),
    Setting(AGENT, "--handover", "PLANEMESH_HANDOVER", None,
            "hot-upgrade socket: a new agent started while one runs takes its listening sockets over it",
            shown_default="/run/planemesh/handover-NETNS.sock (or -host)"),
    Setting(AGENT, "--netns", "PLANEMESH_NETNS", None, "run inside this named network namespace (labs)"),
    Setting(AGENT, "--admin", "PLANEMESH_ADMIN", ADMIN_SOCKET,
            "admin endpoint, unix:///path or 127.0.0.1:PORT (loopback only), repeatable", Kind.LIST),
    Setting(AGENT, "--pin-dir", "PLANEMESH_PIN_DIR", None,
            "bpffs directory for pinned maps, re-adopted after a restart; unset: nothing pinned"),
    Setting(AGENT, "--access-log", "PLANEMESH_ACCESS_LOG", None, "access log file; unset: no access log"),
    Setting(AGENT, "--drain-timeout", "PLANEMESH_DRAIN_TIMEOUT", "5",
            "seconds in-flight requests get to finish after SIGTERM"),
    Setting(AGENT, "--log-level", "PLANEMESH_LOG_LEVEL", "info", "debug, info, warning, error or critical"),
    Setting(AGENT, "--log-format", "PLANEMESH_LOG_FORMAT", "text",
            "text or json (text under systemd carries journald priorities)"),
    Setting(AGENT, "--datapath-only", "PLANEMESH_DATAPATH_ONLY", None,
            "programs and routes only; another proxy binds the plane ports", Kind.SWITCH),
    Setting(AGENT, "--worker-zygote", "PLANEMESH_WORKER_ZYGOTE", None,
            "fork plane workers from a pre-imported process (agent/zygote.py): code pages shared (less PSS, more"
            " RSS: docs/benchmarks.md); default: each worker exec'd", Kind.SWITCH),
    Setting(AGENT, "--no-worker-zygote", "PLANEMESH_NO_WORKER_ZYGOTE", None,
            "exec each plane worker (python -m planemesh.agent.worker_process), the default; overrides"
            " --worker-zygote", Kind.SWITCH),
    Setting(AGENT, "--host-cgroup", "PLANEMESH_HOST_CGROUP", None,
            "host mode: intercept connects in this cgroup v2 (path absolute or below the cgroup2 mount) or systemd"
            " slice (telecom.slice), repeatable", Kind.LIST),
    Setting(AGENT, "--node-id", "PLANEMESH_NODE_ID", None,
            "xDS node.id, replacing the bootstrap's (the DaemonSet sets the Kubernetes node name)"),
    Setting(AGENT, "--node-ip", "PLANEMESH_NODE_IPS", None,
            "this node's addresses, repeatable: sent as xDS node metadata INSTANCE_IPS unless the bootstrap sets"
            " it (the DaemonSet sets status.hostIPs)", Kind.LIST),
    Setting(AGENT, None, "PLANEMESH_NODE_IP", None,
            "this node's primary address, used when PLANEMESH_NODE_IPS and --node-ip are unset (status.hostIP)"),
    Setting(AGENT, "--pod-name", "PLANEMESH_POD_NAME", None,
            "the agent's own pod: sent as xDS node metadata NAME unless the bootstrap sets it"),
    Setting(AGENT, "--host-proc", "PLANEMESH_HOST_PROC", "/proc",
            "the host's /proc as this process sees it (the DaemonSet mounts it at /host/proc): where pod discovery"
            " finds the pods' network namespaces (HOST_PROC/PID/ns/net); AgentOptions.host_proc"),
    # ---- planemesh xds-server -----------------------------------------------------------------------
    Setting(("xds-server",), "--resources", "PLANEMESH_XDS_RESOURCES", None,
            "directory of YAML/JSON Envoy resources (required)"),
    Setting(("xds-server",), "--listen", "PLANEMESH_XDS_LISTEN", "127.0.0.1:18000",
            "host:port, [v6]:port or unix:///path"),
    Setting(("xds-server",), "--poll-interval", "PLANEMESH_XDS_POLL_INTERVAL_S", "0.2",
            "seconds between checks of the resource files; bounds file change -> push latency"),
    Setting(("xds-server",), "--tls-cert", "PLANEMESH_XDS_TLS_CERT", None, "PEM certificate chain: serve TLS"),
    Setting(("xds-server",), "--tls-key", "PLANEMESH_XDS_TLS_KEY", None, "PEM private key of --tls-cert"),
    Setting(("xds-server",), "--bearer-token-file", "PLANEMESH_XDS_BEARER_TOKEN_FILE", None,
            "refuse streams without `authorization: Bearer <this file's token>` (as istiod checks JWTs)"),
    Setting(("xds-server",), "--xds-tokens", "PLANEMESH_XDS_TOKENS", None,
            "file of lines `TOKEN NAMESPACE/SERVICE_ACCOUNT` (or `TOKEN *`): streams presenting one of these tokens"
            " are served, and only to nodes of that identity (NAMESPACE / SERVICE_ACCOUNT metadata), as istiod"
            " authorizes on 15012"),
    Setting(("xds-server",), "--ca", "PLANEMESH_XDS_CA", None,
            "directory of the built-in CA (`planemesh ca init/intermediate`): serve SDS `default` and `ROOTCA` per"
            " node from it; unset: no SDS issuing"),
    Setting(("xds-server",), "--sds-cert-ttl", "PLANEMESH_XDS_SDS_CERT_TTL", "86400",
            "workload certificate lifetime (seconds, or 30m/24h/7d), rotated at half of it"),
    Setting(("xds-server",), "--ca-api", "PLANEMESH_XDS_CA_API", "both",
            "with --ca: what to serve: SDS `default`/`ROOTCA` per node (sds), istio's CreateCertificate (csr:"
            " istiod's shape, workloads send CSRs), or both"),
    Setting(("xds-server",), "--ca-tokens", "PLANEMESH_XDS_CA_TOKENS", None,
            "with --ca: serve istio's CreateCertificate to callers with `authorization: Bearer TOKEN`; file of lines"
            " `TOKEN NAMESPACE/SERVICE_ACCOUNT` (or `TOKEN *`: any identity)",
            shown_default="the --bearer-token-file token may ask for any identity"),
    # ---- planemesh hbone (node-to-node mTLS standalone; the agent runs it itself from an `hbone:` section) ----
    Setting(("hbone",), "--config", "PLANEMESH_HBONE_CONFIG", None,
            "HBONE settings YAML, or a static config with an `hbone:` section (docs/hbone.md; required)"),
    Setting(("hbone",), "--stats", "PLANEMESH_HBONE_STATS", None,
            "write the counters (JSON) to this file every 0.5 s; unset: no counters file"),
    Setting(("hbone",), "--pin-dir", "PLANEMESH_HBONE_PIN_DIR", None,
            "bpffs directory for the capture program's pins; unset: nothing pinned"),
    Setting(("hbone",), "--netns", "PLANEMESH_HBONE_NETNS", None, "run inside this named network namespace (labs)"),
    Setting(("hbone",), "--shared-routing", "PLANEMESH_HBONE_SHARED_ROUTING", None,
            "the agent owns the policy route (same mark): neither install nor remove it", Kind.SWITCH),
    Setting(("hbone",), "--listen-fd", None, None,
            "internal: serve HBONE (15008) on this inherited listening socket (the agent's, kept across restarts)"),
    Setting(("hbone",), "--capture-fd", None, None,
            "internal: serve the capture on this inherited listening socket (the agent's, kept across restarts)"),
    Setting(("hbone",), "--supervised", None, None,
            "internal: started by the agent's supervisor (exits with the agent)", Kind.SWITCH),
    # ---- admin clients: status, planes, stats, config-dump, top -------------------------------------
    Setting(ADMIN_CLIENTS, "--admin", "PLANEMESH_ADMIN", ADMIN_SOCKET,
            "where the agent's admin endpoint is: unix:///path or http://127.0.0.1:PORT (the first of the list)"),
    Setting(("planes",), "--json", None, None, "print the raw JSON", Kind.SWITCH),
    Setting(("stats",), "--json", None, None, "the merged stats report as JSON", Kind.SWITCH),
    Setting(("stats",), "--filter", None, "", "only metrics whose name contains this"),
    Setting(("top",), "--interval", None, "1.0", "seconds between refreshes"),
    Setting(("top",), "--once", None, None, "print one frame (rates over one interval) and exit", Kind.SWITCH),
    Setting(("top",), "--iterations", None, None, "print N frames as text and exit; unset: until q"),
    # ---- labs and the demo --------------------------------------------------------------------------
    Setting(("lab",), "--prefix", "PLANEMESH_LAB_PREFIX", "pm", "network namespace name prefix"),
    Setting(("demo",), "--prefix", "PLANEMESH_LAB_PREFIX", "pmdemo", "network namespace name prefix"),
    Setting(("demo",), "--requests", None, "50", "HTTP requests per plane and family"),
    # ---- planemesh ca (the built-in CA's files; agent/identity/ca_files.py) --------------------------
    Setting(("ca init",), "--out", None, None, "directory for root-cert.pem and root-key.pem (created; required)"),
    Setting(("ca init",), "--trust-domain", None, "cluster.local", "SPIFFE trust domain"),
    Setting(("ca init",), "--name", None, "planemesh root CA", "subject common name"),
    Setting(("ca init",), "--ttl", None, "315360000", "validity (seconds, or 30m/24h/3650d)",
            shown_default="3650d"),
    Setting(("ca intermediate",), "--ca", None, None, "directory of the signing CA (required)"),
    Setting(("ca intermediate",), "--out", None, None,
            "directory for ca-cert.pem, ca-key.pem, cert-chain.pem (created; required)"),
    Setting(("ca intermediate",), "--name", None, "planemesh intermediate CA", "subject common name"),
    Setting(("ca intermediate",), "--ttl", None, "31536000", "validity", shown_default="365d"),
    Setting(("ca issue",), "--ca", None, None, "directory of the signing CA (required)"),
    Setting(("ca issue",), "--spiffe", None, None,
            "spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>: issue for a new key"),
    Setting(("ca issue",), "--csr", None, None, "PEM CSR with one SPIFFE URI SAN (the key stays with its owner)"),
    Setting(("ca issue",), "--out", None, None, "directory for cert-chain.pem, key.pem, root-cert.pem",
            shown_default="PEM on stdout"),
    Setting(("ca issue",), "--ttl", None, "86400", "validity", shown_default="24h"),
)


def setting(command: str, flag: str) -> Setting:
    for s in SETTINGS:
        if command in s.commands and s.flag == flag:
            return s
    raise KeyError(f"{command} {flag}: not in planemesh.model.defaults.SETTINGS")


def env_setting(env: str) -> Setting:
    for s in SETTINGS:
        if s.env == env:
            return s
    raise KeyError(env)


def option(command: str, flag: str, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """add_argument keywords for `flag` of `command`: its default (the variable's value, else the default) and
    help. A repeatable flag defaults to None: read it with `setting(...).values(args.x)`."""
    s = setting(command, flag)
    if s.kind is Kind.SWITCH:
        return {"default": s.switch(environ), "help": s.help()}
    if s.kind is Kind.LIST:
        return {"default": None, "help": s.help()}
    return {"default": s.raw(environ), "help": s.help()}
