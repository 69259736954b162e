"""Where TLS meets istiod's shapes: which TLS contexts of an update planemesh can really serve.

TLS is terminated and originated by xds/translate_tls.py. Istio sends mTLS alongside a plaintext path
(PERMISSIVE: a raw_buffer twin of each TLS chain; auto-mTLS: a plaintext `tlsMode-disabled` match), so when
TLS cannot be served here the plaintext path is used, noted, exactly as before TLS existed:
- a TLS context whose SDS secrets were not served (istiod leaves `default`/`ROOTCA` to istio-agent's SDS;
  `planemesh xds-server --ca` serves them over ADS);
- a TLS listener whose plaintext twin the datapath handles differently (one BPF action per destination: an
  HTTP TLS listener is proxied, so its twin must be a proxied, unsniffed HTTP listener; a TCP TLS listener
  goes to the sniffing listener, so its twin must be TCP too).
Without a plaintext path nothing is dropped: the missing secret or the conflict is the update's error.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from planemesh.model.config import Cluster, Listener
from planemesh.model.tls_config import Secret, TlsContext
from planemesh.xds.translate_common import Errors, note_ignored
from planemesh.xds.translate_tls import resolve_secrets, secret_uses


def _served(tls: TlsContext | None, available: set[str]) -> bool:
    inline = {name for name, _ in tls.inline} if tls is not None else set()
    return tls is None or all(n is None or n in available or n in inline for n in (tls.cert, tls.trust))


def served_cluster(cluster: Cluster, available: set[str]) -> Cluster:
    """transport_socket_matches whose secrets are missing -> the plaintext default match, noted."""
    if cluster.tls is not None or all(_served(m.tls, available) for m in cluster.tls_matches):
        return cluster
    note_ignored(
        f"cluster[{cluster.name}].transport_socket_matches",
        "the TLS match's SDS secrets were not served: tlsMode istio endpoints are reached in plaintext through "
        "the plaintext match (Istio PERMISSIVE peers accept it; STRICT peers refuse it)",
    )
    eps = tuple(dataclasses.replace(e, tls_socket=-1) for e in cluster.endpoints)
    return dataclasses.replace(cluster, endpoints=eps, tls_matches=())


def _key(lsn: Listener) -> tuple:
    return (lsn.plane, lsn.port, lsn.prefixes, lsn.server_names)


def served_listeners(listeners: Iterable[Listener], available: set[str]) -> list[Listener]:
    """TLS listeners with a plaintext twin that cannot be served (see the module doc) are dropped, noted."""
    listeners = list(listeners)
    plain: dict[tuple, list[Listener]] = {}
    for lsn in listeners:
        if lsn.tls is None:
            plain.setdefault(_key(lsn), []).append(lsn)
    out = []
    for lsn in listeners:
        twins = plain.get(_key(lsn), [])
        if lsn.tls is None or not twins:
            out.append(lsn)
            continue
        if not _served(lsn.tls, available):
            why = "its SDS secrets were not served"
        elif any(t.sniff is not lsn.sniff or t.protocol is not lsn.protocol for t in twins):  # both sniffed: fine
            why = (
                f"its plaintext twin {twins[0].name!r} is sniffed or of the other protocol (HTTP / TCP) and the "
                "datapath has one action per port"
            )
        else:
            out.append(lsn)
            continue
        note_ignored(
            f"listener[{lsn.name}].transport_socket",
            f"TLS is not terminated here: {why}; plaintext peers use the plaintext chain, TLS bytes reach the "
            "original destination as they did before planemesh terminated TLS",
        )
    return out


def secrets_of(contexts: Iterable[TlsContext | None], user: str, received, out: dict[str, Secret]) -> str | None:
    """One resource's secrets into `out` (xds/per_resource.py), or why they cannot be used."""
    errors = Errors()
    used: dict[str, tuple[str, type]] = {}
    inline: dict[str, Secret] = {}
    for tls in contexts:
        if tls is not None:
            secret_uses(tls, user, used, inline)
    got = resolve_secrets(used, received, inline, errors)
    if errors.items:
        return "; ".join(str(e) for e in errors.items)
    out.update(got)
    return None


def cluster_tls_error(cluster: Cluster, received, out: dict[str, Secret]) -> str | None:
    """A cluster's TLS that cannot be served: its secrets (added to `out` when fine)."""
    user = f"cluster[{cluster.name}].transport_socket"
    return secrets_of((cluster.tls, *(m.tls for m in cluster.tls_matches)), user, received, out)


__all__ = ["cluster_tls_error", "secrets_of", "served_cluster", "served_listeners"]
