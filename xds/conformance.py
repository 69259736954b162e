"""The istiod conformance table: each resource of a corpus, Envoy 1.40's verdict, planemesh's, and what
planemesh accepts without effect (with why that is safe). Writes docs/istio-conformance.md.

    python -m planemesh.xds.conformance [--corpus DIR] [--envoy PATH] [--refresh-envoy] [--write FILE]

Envoy's verdict comes from `envoy --mode validate` on a static bootstrap holding the resource, after the
istio-proxy-only extensions are removed (upstream Envoy has none of them; istio-proxy has them all). Envoy
verdicts are cached in the corpus (`envoy_verdicts.json`, keyed by a hash of the resource) because one
validation takes about a second; `--refresh-envoy` runs Envoy for every resource again.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from types import MappingProxyType

from google.protobuf import any_pb2

from planemesh.ebpf.policy import tcp_handling
from planemesh.model.config import ConfigError, ListenerProtocol
from planemesh.model.ip import IPNetwork
from planemesh.model.planes import Plane
from planemesh.xds import resources as res
from planemesh.xds.client_state import XdsResources
from planemesh.xds.istio_ext import ISTIO_PROXY_TYPES, TYPED_STRUCTS
from planemesh.xds.per_resource import translate_update
from planemesh.xds.translate import _Acc, translate_listener
from planemesh.xds.translate_clusters import endpoints_of, translate_cluster
from planemesh.xds.translate_common import collect_ignored, stop_collecting
from planemesh.xds.translate_routes import translate_route_config

CORPUS = Path(__file__).resolve().parents[1] / "tests" / "xds" / "istio_corpus"
DOC = Path(__file__).resolve().parents[1] / "docs" / "istio-conformance.md"
FILES = (("listeners.json", res.LISTENER), ("routes.json", res.ROUTE), ("clusters.json", res.CLUSTER))
FILES += (("endpoints.json", res.ENDPOINT),)
KIND = {res.LISTENER: "Listener", res.ROUTE: "RouteConfiguration", res.CLUSTER: "Cluster"}
KIND[res.ENDPOINT] = "ClusterLoadAssignment"
# The node the corpus is translated for: a pod network and a second (Multus) plane.
PLANES = (
    Plane("pod", 1, ("eth0",), (IPNetwork("10.244.0.0/16"),)),
    Plane("media", 2, ("net1",), (IPNetwork("198.18.2.0/24"),), proxy_port=15101, sniff_port=15102),
)
ENVOY_TIMEOUT_S = 60.0
INTERNAL = "type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener"


@dataclasses.dataclass(slots=True)
class Row:
    kind: str
    name: str
    raw: dict
    envoy: str = "?"  # "accepted" / "rejected: ..." / "?" (not validated)
    planemesh: str = ""
    ignored: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.raw, sort_keys=True).encode()).hexdigest()[:16]


# ---- loading: istio-proxy-only types have no proto here; xds/resources.py carries them as TypedStruct ------


def load_corpus(corpus: Path = CORPUS) -> list[tuple[Row, any_pb2.Any]]:
    out = []
    for fname, type_url in FILES:
        for i, raw in enumerate(json.loads((corpus / fname).read_text())):
            packed = res.parse_resource_dict(raw, f"{fname}[{i}]")
            msg = res.unpack(packed, type_url)
            out.append((Row(KIND[type_url], res.resource_name(msg), raw), msg))
    return out


# ---- planemesh's verdict ---------------------------------------------------------------------------------


def planemesh_verdicts(rows: list[tuple[Row, object]], planes: tuple[Plane, ...] = PLANES) -> None:
    """Each resource translated on its own (references between resources are the client's business)."""
    endpoints = {r.name: m for r, m in rows if r.kind == "ClusterLoadAssignment"}
    for row, msg in rows:
        notes, token = collect_ignored()
        path = {"Listener": "listener", "RouteConfiguration": "route_config", "Cluster": "cluster"}.get(
            row.kind, "endpoints"
        ) + f"[{row.name}]"
        try:
            if row.kind == "Listener":
                translate_listener(msg, planes, _Acc(routes={}, sla={}, sla_origin={}, tcp_clusters=[]), path)
            elif row.kind == "RouteConfiguration":
                translate_route_config(msg, path)
            elif row.kind == "Cluster":
                translate_cluster(msg, endpoints, planes, path)
            else:
                endpoints_of(msg, path)
            row.planemesh = "accepted"
        except ConfigError as exc:
            row.planemesh = f"rejected: {exc}"
        finally:
            stop_collecting(token)
        row.ignored = notes


def tcp_chains(rows: list[tuple[Row, object]], planes: tuple[Plane, ...] = PLANES) -> list[str]:
    """The corpus's tcp_proxy chains on the first plane, as the data path handles them (ebpf/policy.py
    tcp_handling): the whole push applied resource by resource, as the client applies it."""
    kinds: dict[str, dict[str, object]] = {kind: {} for kind in KIND.values()}
    for row, msg in rows:
        kinds[row.kind][row.name] = msg
    push = XdsResources(
        listeners=MappingProxyType(kinds["Listener"]),  # type: ignore[arg-type]
        routes=MappingProxyType(kinds["RouteConfiguration"]),  # type: ignore[arg-type]
        clusters=MappingProxyType(kinds["Cluster"]),  # type: ignore[arg-type]
        endpoints=MappingProxyType(kinds["ClusterLoadAssignment"]),  # type: ignore[arg-type]
        versions=MappingProxyType({"LDS": "1"}),
    )
    _notes, token = collect_ignored()  # noted already, per resource, in the table above
    try:
        snap = translate_update(push, planes).snapshot
    finally:
        stop_collecting(token)
    out = ["| chain | port | destination | cluster | data path | why |", "|---|---|---|---|---|---|"]
    for lsn in sorted(snap.listeners_of(planes[0].name), key=lambda lsn: (lsn.port, lsn.name)):
        if lsn.protocol is not ListenerProtocol.TCP:
            continue
        bypass, why = tcp_handling(lsn, snap.clusters)
        dst = ", ".join(str(p) for p in lsn.prefixes) or "any"
        cluster = ", ".join(w.name for w in lsn.tcp_clusters) or "-"
        path = "kernel bypass" if bypass else "relayed by the proxy"
        out.append(f"| `{_cell(lsn.name)}` | {lsn.port} | {dst} | `{_cell(cluster)}` | {path} | {_cell(why)} |")
    return out


TCP_RULE = [
    "A `tcp_proxy` chain is bypassed in the kernel (BPF forwards the connection to its original destination)",
    "only where its cluster would pick that destination anyway: an ORIGINAL_DST (passthrough) cluster, a cluster",
    "whose healthy endpoints hold every destination the chain matches, or istiod's default chain of a",
    "per-service listener (`VIP_PORT`, `bind_to_port: false`) to that service's own cluster",
    "`outbound|PORT||HOST`: no chain metadata `istio.config` (istiod marks a chain built from a VirtualService",
    "with it), no `filter_chain_match` of its own, the listener's port, no subset. Every other chain (a",
    "VirtualService `tcp:` route to another host, a DestinationRule subset, a weighted split, SNI, network RBAC,",
    "TLS termination, and TLS origination: a cluster whose `transport_socket_matches` give an endpoint mTLS, as",
    "istiod's `tlsMode: istio` match does once its SDS secrets are served) is relayed by the plane's proxy to its",
    "cluster, which originates TLS per endpoint (`ebpf/policy.py` `tcp_handling`, `xds/translate_tcp.py`,",
    "`agent/proxy/tcp_originate.py`; `tests/unit/test_tcp_bypass_rule.py`). The TCP chain behind an HTTP chain",
    "of one destination (an auto-protocol port) follows the same rule for the bytes that are not HTTP. The",
    "corpus's chains on plane `pod`, the whole push applied as the client applies it (without SDS secrets:",
    "istiod sends none, so `tlsMode: istio` endpoints keep the plaintext match and the mTLS twins are dropped):",
]


# ---- Envoy's verdict -------------------------------------------------------------------------------------


def _istio_only(node) -> bool:
    if not isinstance(node, dict):
        return False
    tc = node.get("typed_config") or {}
    kind = str(tc.get("@type", "")).rsplit("/", 1)[-1]
    if kind in TYPED_STRUCTS:
        kind = str(tc.get("type_url", "")).rsplit("/", 1)[-1]
    return kind in ISTIO_PROXY_TYPES


def strip_istio(node):
    """The resource as upstream Envoy can load it: istio-proxy-only filters removed from every filter list."""
    if isinstance(node, list):
        return [strip_istio(x) for x in node if not _istio_only(x)]
    if isinstance(node, dict):
        return {k: strip_istio(v) for k, v in node.items()}
    return node


def envoy_bootstrap(kind: str, raw: dict) -> dict:
    body = strip_istio({k: v for k, v in raw.items() if k != "@type"})
    xds = {
        "name": "xds-grpc",
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": "xds-grpc",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _addr("127.0.0.1", 15010)}}]}],
        },
    }
    listeners, clusters = [], [xds]
    if kind == "Listener":
        listeners.append(body)
    elif kind == "Cluster":
        clusters.append(body)
    elif kind == "ClusterLoadAssignment":
        clusters.append({"name": "cla-holder", "type": "STATIC", "connect_timeout": "1s", "load_assignment": body})
    else:  # a RouteConfiguration: inline in an HTTP connection manager
        hcm = {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
            ".HttpConnectionManager",
            "stat_prefix": "rc",
            "route_config": body,
            "http_filters": [
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
                }
            ],
        }
        filters = [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]
        listeners.append(
            {"name": "rc-holder", "address": _addr("127.0.0.1", 10000), "filter_chains": [{"filters": filters}]}
        )
    return {
        # istio-proxy's bootstrap enables internal listeners (waypoints and HBONE use them)
        "bootstrap_extensions": [{"name": "envoy.bootstrap.internal_listener", "typed_config": {"@type": INTERNAL}}],
        "node": {"id": "sidecar~10.244.0.5~productpage-v1.default~default.svc.cluster.local", "cluster": "productpage"},
        "static_resources": {"listeners": listeners, "clusters": clusters},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}],
            }
        },
    }


def _addr(ip: str, port: int) -> dict:
    return {"socket_address": {"address": ip, "port_value": port}}


def envoy_verdict(envoy: str, kind: str, raw: dict) -> str:
    with tempfile.TemporaryDirectory(prefix="pm-conformance-") as tmp:
        path = Path(tmp) / "bootstrap.json"
        path.write_text(json.dumps(envoy_bootstrap(kind, raw)))
        proc = subprocess.run(
            [envoy, "--mode", "validate", "-c", str(path), "--log-level", "critical", "--disable-hot-restart"],
            capture_output=True,
            text=True,
            timeout=ENVOY_TIMEOUT_S,
            check=False,
        )
    if proc.returncode == 0:
        return "accepted"
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip() and "OK" not in ln]
    last = lines[-1].strip() if lines else f"exit {proc.returncode}"
    # "[time][pid][critical][main] [file:line] error initializing configuration '/tmp/...': WHY" -> WHY
    return "rejected: " + last.split("': ", 1)[-1][:300]


def envoy_verdicts(rows: list[Row], envoy: str | None, cache_file: Path, refresh: bool) -> None:
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    for row in rows:
        key = f"{row.kind}/{row.name}/{row.digest}"
        if envoy is not None and (refresh or key not in cache):
            cache[key] = envoy_verdict(envoy, row.kind, row.raw)
        row.envoy = cache.get(key, "?")
    if envoy is not None:
        live = {f"{r.kind}/{r.name}/{r.digest}" for r in rows}
        cache_file.write_text(json.dumps({k: v for k, v in sorted(cache.items()) if k in live}, indent=1) + "\n")


# ---- the table -------------------------------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _field(path: str) -> str:
    """`listener[x].filter_chains[3].filters[0].normalize_path` -> `filter_chains[].filters[].normalize_path`."""
    rest = path.split("]", 1)[1].lstrip(".") if "]" in path else path
    return re.sub(r"\[[^\]]*\]", "[]", rest) or "(whole resource)"


def _summary(rows: list[Row]) -> list[str]:
    """One line per (field, reason): how many resources of the corpus carry it."""
    seen: dict[tuple[str, str, str], set[str]] = {}
    for r in rows:
        for path, why in r.ignored:
            seen.setdefault((r.kind, _field(path), why), set()).add(r.name)
    out = ["| type | field | why ignoring it is safe | resources |", "|---|---|---|---|"]
    for (kind, fld, why), names in sorted(seen.items()):
        out.append(f"| {kind} | `{_cell(fld)}` | {_cell(why)} | {len(names)} |")
    return out


def render(rows: list[Row], tcp: list[str] | None = None) -> str:
    accepted_by_envoy = [r for r in rows if r.envoy == "accepted"]
    both = [r for r in accepted_by_envoy if r.planemesh == "accepted"]
    out = [
        "# istiod conformance",
        "",
        "Generated by `python -m planemesh.xds.conformance --write docs/istio-conformance.md` from the corpus in",
        "`tests/xds/istio_corpus/` (the sidecar of bookinfo's productpage as istiod 1.2x builds it; see its",
        "README); `tests/unit/test_istio_conformance.py` regenerates it and fails when it differs. Envoy's verdict:",
        "`envoy --mode validate` (Envoy 1.40) on the resource with the istio-proxy-only extensions removed.",
        "planemesh's verdict: the resource translated on its own for a node with planes `pod` (10.244.0.0/16)",
        "and `media` (198.18.2.0/24). Do not edit by hand.",
        "",
        f"**{len(both)} of {len(accepted_by_envoy)} resources Envoy accepts are accepted by planemesh** "
        f"({len(rows)} resources in the corpus).",
        "",
        "| # | type | name | Envoy 1.40 | planemesh |",
        "|---|---|---|---|---|",
    ]
    for i, r in enumerate(rows, 1):
        out.append(f"| {i} | {r.kind} | `{_cell(r.name)}` | {_cell(r.envoy)} | {_cell(r.planemesh)} |")
    if tcp:
        out += ["", "## tcp_proxy chains: kernel bypass or proxy", "", *TCP_RULE, "", *tcp]
    out += ["", "## Accepted without effect, and why that is safe", "", *_summary(rows), "", "### Per resource", ""]
    for i, r in enumerate(rows, 1):
        if not r.ignored:
            continue
        out += [f"#### {i}. {r.kind} `{_cell(r.name)}`", "", "| field | why ignoring it is safe |", "|---|---|"]
        seen = set()
        for path, why in r.ignored:
            if (path, why) in seen:
                continue
            seen.add((path, why))
            out.append(f"| `{_cell(path)}` | {_cell(why)} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def build(corpus: Path = CORPUS, envoy: str | None = None, refresh: bool = False) -> str:
    loaded = load_corpus(corpus)
    planemesh_verdicts(loaded)
    rows = [r for r, _ in loaded]
    envoy_verdicts(rows, envoy, corpus / "envoy_verdicts.json", refresh)
    return render(rows, tcp_chains(loaded))


# Not read from __doc__, which -OO drops.
DESCRIPTION = "The istiod conformance table: each resource of a corpus, Envoy's verdict, planemesh's."


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m planemesh.xds.conformance", description=DESCRIPTION)
    ap.add_argument("--corpus", type=Path, default=CORPUS)
    ap.add_argument("--envoy", help="an Envoy binary: validate resources missing from the cache")
    ap.add_argument("--refresh-envoy", action="store_true", help="validate every resource again (needs --envoy)")
    ap.add_argument("--write", type=Path, help="write the table here instead of printing it")
    args = ap.parse_args(argv)
    text = build(args.corpus, args.envoy, args.refresh_envoy)
    if args.write:
        args.write.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["Row", "build", "envoy_bootstrap", "envoy_verdict", "load_corpus", "render", "strip_istio"]
