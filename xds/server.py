"""A small ADS management server (SotW and Delta) serving Envoy resources from YAML/JSON files.

    server = ManagementServer("resources/")
    address = await server.start("127.0.0.1:0")   # -> "127.0.0.1:40123"
    ...
    await server.stop()

Files (`*.yaml`, `*.yml`, `*.json`) hold a list of resources, each with an `@type` (json_format's Any
form). Resources of other types than the xDS five (any protobuf message with a name, or opaque
`{"@type", "@name", "@value_base64"}`) are served to whoever subscribes to their type URL; nested
extension configs of types nobody here knows are served as TypedStruct (xds/resources.py). The
directory is polled every 200 ms; a changed set is validated first (parse, unique names) and pushed to
every subscribed stream; a broken file is reported in `load_error` and the last good set keeps being
served. Each client's ACKs and NACKs are tracked (`clients()`).
`set_resources(type_url, messages)` replaces one type's set from code (no file, no poll delay); with
`resource_dir=None` the server serves only what is set that way.
Per-node resources (istiod computes a configuration per proxy): `nodes/<key>/` below the directory, or
`set_node_resources(key, type_url, messages)`, adds resources for the streams whose node id is `<key>`, or whose
pod part is `<key>` (`sidecar~<ip>~<pod>.<ns>~...` -> `<pod>.<ns>`); a per-node resource replaces the shared
one of the same type and name for that node only.
`main(argv)` is `planemesh xds-server --resources DIR --listen ADDR`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import logging
import signal
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2, message

from planemesh.agent.identity.ca_grpc import certificate_service
from planemesh.agent.identity.ca_service import CsrSigner
from planemesh.aio import stop_tasks
from planemesh.model.defaults import option
from planemesh.xds.resources import (
    MESSAGE_OF_TYPE,
    RESOURCE_SUFFIXES,
    SECRET,
    SHORT_NAME,
    ResourceError,
    load_resource_dir,
)
from planemesh.xds.sds import SecretIssuer, add_sds_arguments, issuer_from_args, signer_from_args
from planemesh.xds.server_auth import add_auth_arguments, authenticate, identities_from_args, identity_mismatch
from planemesh.xds.server_nodes import NODES_DIR, load_node_dirs, packed

log = logging.getLogger("planemesh.xds.server")
_CHANGED = object()
_EOF = object()


@dataclass(slots=True)
class TypeReport:
    sent_version: str = ""
    acked_version: str = ""
    acks: int = 0
    nacks: int = 0
    last_nack: str | None = None
    subscribed: tuple[str, ...] = ()
    responses: int = 0  # responses written on this stream for this type
    resources_sent: int = 0  # resources carried by them
    bytes_sent: int = 0  # their serialized size (the gRPC message bodies)


@dataclass(slots=True)
class ClientStatus:
    """What one ADS stream did: its node, and per type what was sent, ACKed and NACKed."""

    node_id: str
    mode: str
    peer: str
    connected: bool = True
    types: dict[str, TypeReport] = field(default_factory=dict)
    first_send_at: float | None = None  # time.monotonic() of the first response written (benchmarks)
    node: Any = None  # the envoy.config.core.v3.Node of the stream's first request (SDS identity)
    identity: tuple[str, str] | None = None  # (namespace, service account) of its token (token_identities)

    def report(self, type_url: str) -> TypeReport:
        return self.types.setdefault(SHORT_NAME.get(type_url, type_url), TypeReport())


@dataclass(slots=True)
class _Sub:
    wildcard: bool
    names: set[str]
    sent_version: str = ""
    sent_nonce: str = ""
    known: dict[str, str] = field(default_factory=dict)  # Delta: name -> version the client holds
    told_absent: set[str] = field(default_factory=set)  # Delta: subscribed names reported as not existing
    answered: bool = False  # Delta: a response was sent for this type (an empty wildcard needs one)
    nonce_versions: dict[str, str] = field(default_factory=dict)  # Delta: nonce -> system version


def resource_version(packed: any_pb2.Any) -> str:
    """A Delta resource version: a digest of the resource, so an unchanged resource is never resent."""
    return hashlib.sha256(packed.SerializeToString(deterministic=True)).hexdigest()[:16]


class ManagementServer:
    def __init__(
        self,
        resource_dir: str | Path | None,
        *,
        poll_interval_s: float = 0.2,
        bearer_token: str | None = None,
        secrets: SecretIssuer | None = None,
        csr_signer: CsrSigner | None = None,
        token_identities: Mapping[str, tuple[str, str] | None] | None = None,
    ) -> None:
        # istiod's 15012: a token stands for (namespace, service account), and a stream is served only when its
        # node is that identity's (NAMESPACE / SERVICE_ACCOUNT metadata): pilot/pkg/xds/auth.go authorize()
        self.token_identities = dict(token_identities) if token_identities is not None else None
        self.csr_signer = csr_signer  # istio's CreateCertificate from the built-in CA (agent/identity/ca_service.py)
        self.secrets = secrets  # SDS `default`/`ROOTCA` per node from the built-in CA (xds/sds.py)
        self._rotator: asyncio.Task[None] | None = None
        self.resource_dir = Path(resource_dir) if resource_dir is not None else None
        self.bearer_token = bearer_token  # when set, streams without `authorization: Bearer <it>` are refused
        self.poll_interval_s = poll_interval_s
        self.resources: dict[str, dict[str, any_pb2.Any]] = {t: {} for t in MESSAGE_OF_TYPE}
        # Per-resource digests, computed once per accepted change: Delta versions and change detection
        # would otherwise re-serialize and hash every resource on every push to every stream.
        self.digests: dict[str, dict[str, str]] = {t: {} for t in MESSAGE_OF_TYPE}
        self.type_versions: dict[str, int] = dict.fromkeys(MESSAGE_OF_TYPE, 0)
        self.version = 0  # bumped on every accepted change of the resource set
        # per-node overlays: key -> type -> name -> Any, their digests, and a version per key
        self.node_resources: dict[str, dict[str, dict[str, any_pb2.Any]]] = {}
        self.node_digests: dict[str, dict[str, dict[str, str]]] = {}
        self.node_versions: dict[str, int] = {}
        self.load_error: str | None = None
        self._signature: tuple | None = None
        self._watchers: set[asyncio.Queue[Any]] = set()
        self._clients: list[ClientStatus] = []
        self._nonces = itertools.count(1)
        self._server: grpc.aio.Server | None = None
        self._poller: asyncio.Task[None] | None = None

    # ---- resources -------------------------------------------------------------------------------

    def _dir_signature(self) -> tuple:
        if self.resource_dir is None:
            return ()
        try:
            entries = sorted(self.resource_dir.iterdir())
        except OSError as exc:
            return (("<error>", str(exc)),)
        nodes = self.resource_dir / NODES_DIR
        with contextlib.suppress(OSError):
            entries += [p for d in sorted(nodes.iterdir()) if d.is_dir() for p in sorted(d.iterdir())]
        sig = []
        for path in entries:
            if path.suffix in RESOURCE_SUFFIXES and not path.name.startswith("."):
                with contextlib.suppress(OSError):
                    st = path.stat()
                    sig.append((str(path.relative_to(self.resource_dir)), st.st_mtime_ns, st.st_size))
        return tuple(sig)

    def reload(self) -> bool:
        """Re-read the directory if it changed. True when a new valid set was taken."""
        if self.resource_dir is None:
            return False
        sig = self._dir_signature()
        if sig == self._signature:
            return False
        self._signature = sig
        try:
            loaded = load_resource_dir(self.resource_dir)
            nodes = load_node_dirs(self.resource_dir / NODES_DIR)
        except (ResourceError, OSError) as exc:
            self.load_error = str(exc)
            log.error("resources not loaded, still serving version %d: %s", self.version, exc)
            return False
        self.load_error = None
        changed = False
        for key in set(self.node_resources) - set(nodes):
            changed |= self._take_node(key, {}, wake=False)
        for key, overlay in nodes.items():
            changed |= self._take_node(key, overlay, wake=False)
        if self._take(loaded):
            return True
        if changed:
            self._wake_all()
        return changed

    def set_node_resources(self, key: str, type_url: str, messages: Iterable[message.Message]) -> bool:
        """Serve `messages` as node `key`'s own resources of `type_url` (replacing the shared ones of the same
        names for that node; an empty list removes the overlay of that type). Errors as set_resources."""
        items = packed(type_url, messages)
        return self._take_node(key, {**self.node_resources.get(key, {}), type_url: items})

    def _take_node(self, key: str, overlay: dict[str, dict[str, any_pb2.Any]], wake: bool = True) -> bool:
        overlay = {t: items for t, items in overlay.items() if items}
        digests = {t: {n: resource_version(a) for n, a in items.items()} for t, items in overlay.items()}
        if digests == self.node_digests.get(key, {}):
            return False
        if overlay:
            self.node_resources[key], self.node_digests[key] = overlay, digests
        else:
            self.node_resources.pop(key, None)
            self.node_digests.pop(key, None)
        self.node_versions[key] = self.node_versions.get(key, 0) + 1
        self.version += 1
        log.info("node %s: %d own resources (version %d)", key, sum(map(len, overlay.values())), self.version)
        if wake:
            self._wake_all()
        return True

    def node_key(self, node_id: str) -> str | None:
        """The overlay serving `node_id`: its exact id, else its pod part `<pod>.<ns>`, else None."""
        if node_id in self.node_resources:
            return node_id
        parts = node_id.split("~")
        if len(parts) == 4 and parts[2] in self.node_resources:
            return parts[2]
        return None

    def set_resources(self, type_url: str, messages: Iterable[message.Message]) -> bool:
        """Serve `messages` as the whole set of `type_url` (the in-process API: no file, no poll delay).

        Raises ResourceError (nothing changes) for an unknown type, a message of another type, a resource
        without a name or a duplicate name. True when the set changed and was pushed. A later change of
        the resource directory replaces every type again (the last writer wins).
        """
        return self._take({**self.resources, type_url: packed(type_url, messages)})

    def _take(self, loaded: dict[str, dict[str, any_pb2.Any]]) -> bool:
        """Adopt a validated set: bump the versions of the types that changed and wake every stream."""
        changed = False
        digests = {}
        for type_url in self.digests.keys() - loaded.keys():  # a type no longer in the directory
            loaded[type_url] = {}
        for type_url, items in loaded.items():
            old = self.digests.get(type_url, {})
            self.type_versions.setdefault(type_url, 0)
            if items is self.resources.get(type_url):
                digests[type_url] = old  # untouched type (set_resources of another one)
                continue
            digests[type_url] = {n: resource_version(a) for n, a in items.items()}
            if digests[type_url] != old:
                self.type_versions[type_url] += 1
                changed = True
        if not changed:
            return False
        self.resources, self.digests = loaded, digests
        self.version += 1
        log.info("serving resource set version %d (%s)", self.version, self._counts())
        self._wake_all()
        return True

    def _wake_all(self) -> None:
        for queue in self._watchers:
            queue.put_nowait(_CHANGED)

    def _served(self, type_url: str, status: ClientStatus) -> tuple[dict[str, any_pb2.Any], dict[str, str], str]:
        """(resources, Delta digests, SotW version) of one type for one stream: SDS is per node."""
        if type_url == SECRET and self.secrets is not None and status.node is not None:
            return self.secrets.served(status.node, self.resources.get(SECRET, {}), self.type_versions.get(SECRET, 0))
        # .get: a type URL nobody serves is answered with an empty set, never a KeyError
        current, digests = self.resources.get(type_url, {}), self.digests.get(type_url, {})
        version = str(self.type_versions.get(type_url, 0))
        key = self.node_key(status.node_id) if self.node_resources else None
        if key is not None:  # this node's own resources over the shared ones
            own = self.node_resources[key].get(type_url, {})
            current, digests = {**current, **own}, {**digests, **self.node_digests[key].get(type_url, {})}
            version = f"{version}.{key}.{self.node_versions[key]}"
        return current, digests, version

    def _counts(self) -> str:
        return ", ".join(f"{SHORT_NAME.get(t, t)} {len(r)}" for t, r in self.resources.items() if r)

    def clients(self) -> list[ClientStatus]:
        return list(self._clients)

    # ---- lifecycle -------------------------------------------------------------------------------

    async def start(self, address: str = "127.0.0.1:0", credentials: grpc.ServerCredentials | None = None) -> str:
        """Listen (TLS with `credentials`, e.g. grpc.ssl_server_credentials) and return the bound address."""
        self.reload()
        server = grpc.aio.server()
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(_AdsServicer(self), server)
        if self.csr_signer is not None:  # on the same port, as istiod serves both on 15012
            server.add_generic_rpc_handlers((certificate_service(self.csr_signer),))
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
        if not address.startswith("unix:") and port == 0:
            raise OSError(f"cannot listen on {address}")
        await server.start()
        self._server = server
        if self.resource_dir is not None:
            self._poller = asyncio.create_task(self._poll())
        if self.secrets is not None:
            self._rotator = asyncio.create_task(self.secrets.rotate_forever(self._wake_all))
        if address.startswith("unix:"):
            return address
        return f"{address.rsplit(':', 1)[0]}:{port}"

    async def stop(self, grace_s: float = 0.5) -> None:
        await stop_tasks(self._poller, self._rotator)
        if self._server is not None:
            for queue in self._watchers:
                queue.put_nowait(_EOF)
            await self._server.stop(grace_s)
            self._server = None

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            self.reload()

    # ---- one ADS stream --------------------------------------------------------------------------

    async def serve_stream(self, context: grpc.aio.ServicerContext, delta: bool) -> None:
        identity = None
        if self.bearer_token is not None or self.token_identities is not None:  # istiod checks the JWT likewise
            got = {m.key: m.value for m in context.invocation_metadata() or ()}.get("authorization")
            identity, why = authenticate(got, self.bearer_token, self.token_identities)
            if why is not None:
                await _drain(context)  # the client's first requests are read: none races the refusal
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"authentication failed: {why}")
        status = ClientStatus(node_id="", mode="delta" if delta else "sotw", peer=context.peer())
        status.identity = identity
        self._clients.append(status)
        events: asyncio.Queue[Any] = asyncio.Queue()
        self._watchers.add(events)
        reader = asyncio.create_task(self._read(context, events))
        subs: dict[str, _Sub] = {}
        try:
            while True:
                event = await events.get()
                if event is _EOF:
                    return
                if event is _CHANGED:
                    for type_url, sub in subs.items():
                        await self._push(context, type_url, sub, delta, status)
                    continue
                await self._on_request(context, event, subs, delta, status)
        finally:
            status.connected = False
            self._watchers.discard(events)
            await stop_tasks(reader)

    @staticmethod
    async def _read(context: grpc.aio.ServicerContext, events: asyncio.Queue[Any]) -> None:
        try:
            while True:
                req = await context.read()
                if req is grpc.aio.EOF:
                    break
                events.put_nowait(req)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass
        events.put_nowait(_EOF)

    async def _on_request(self, context, req, subs: dict[str, _Sub], delta: bool, status: ClientStatus) -> None:
        if req.node.id:
            status.node_id = req.node.id
        if status.node is None and req.HasField("node"):
            status.node = req.node
            if status.identity is not None and (why := identity_mismatch(req.node, status.identity)) is not None:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"authorization failed: {why}")
        type_url = req.type_url
        if not type_url:
            log.warning("%s sent a request without a type URL", status.node_id or status.peer)
            return
        report = status.report(type_url)
        sub = subs.get(type_url)
        first = sub is None
        if delta:
            subscribe = set(req.resource_names_subscribe)
            if sub is None:
                sub = subs[type_url] = _Sub(wildcard=not subscribe or "*" in subscribe, names=set())
                sub.known = dict(req.initial_resource_versions)
                # A fresh subscription is answered even when empty; a client resuming with versions
                # (a reconnect) is answered only with what changed.
                sub.answered = bool(sub.known)
            if req.response_nonce:
                version = sub.nonce_versions.pop(req.response_nonce, "")
                self._record(report, req, version, status)
            if "*" in req.resource_names_unsubscribe:
                sub.wildcard = False
            sub.names |= subscribe - {"*"}
            sub.wildcard = sub.wildcard or "*" in subscribe
            for name in req.resource_names_unsubscribe:
                sub.names.discard(name)
                sub.told_absent.discard(name)
                if not sub.wildcard:
                    sub.known.pop(name, None)
            report.subscribed = ("*",) if sub.wildcard else tuple(sorted(sub.names))
            await self._push(context, type_url, sub, delta, status)
            return
        names = set(req.resource_names)
        if sub is None:
            # Legacy wildcard: a first request without names (or naming "*") asks for everything.
            sub = subs[type_url] = _Sub(wildcard=not names or "*" in names, names=names - {"*"})
        elif req.response_nonce and req.response_nonce != sub.sent_nonce:
            return  # stale: answers a response that a newer one superseded
        nack = req.HasField("error_detail")
        if req.response_nonce:
            self._record(report, req, sub.sent_version if nack else req.version_info, status)
        changed = False
        if not first:
            wildcard = (sub.wildcard and not names) or "*" in names
            changed = wildcard != sub.wildcard or (names - {"*"}) != sub.names
            sub.wildcard, sub.names = wildcard, names - {"*"}
        report.subscribed = ("*",) if sub.wildcard else tuple(sorted(sub.names))
        if first or changed:
            await self._push(context, type_url, sub, delta, status, force=True)
        elif not nack:
            await self._push(context, type_url, sub, delta, status)

    def _record(self, report: TypeReport, req, version: str, status: ClientStatus) -> None:
        if req.HasField("error_detail"):
            report.nacks += 1
            report.last_nack = req.error_detail.message
            log.warning(
                "%s NACKed %s version %s: %s",
                status.node_id,
                SHORT_NAME.get(req.type_url, req.type_url),
                version,
                req.error_detail.message,
            )
        else:
            report.acks += 1
            report.acked_version = version

    async def _push(
        self, context, type_url: str, sub: _Sub, delta: bool, status: ClientStatus, force: bool = False
    ) -> None:
        current, versions, version = self._served(type_url, status)
        wanted = current if sub.wildcard else {n: current[n] for n in sorted(sub.names) if n in current}
        report = status.report(type_url)
        nonce = str(next(self._nonces))
        if delta:
            updated = [n for n in wanted if sub.known.get(n) != versions[n]]
            removed = [n for n in sub.known if n not in current]
            # Names asked for that do not exist go in removed_resources, once (the protocol requires it:
            # a client waiting for them stops warming).
            absent = sorted(n for n in sub.names if n not in current and n not in sub.known) if sub.names else []
            absent = [n for n in absent if n not in sub.told_absent]
            sub.told_absent.update(absent)
            sub.told_absent.difference_update(updated)
            removed += absent
            if not updated and not removed and sub.answered:
                return
            sub.answered = True  # the first answer is sent even if empty: an empty wildcard is a state
            resp = discovery_pb2.DeltaDiscoveryResponse(
                type_url=type_url, nonce=nonce, system_version_info=str(self.version), removed_resources=removed
            )
            for name in updated:
                resp.resources.add(name=name, version=versions[name]).resource.CopyFrom(wanted[name])
                sub.known[name] = versions[name]
            for name in removed:
                sub.known.pop(name, None)
            sub.nonce_versions[nonce] = str(self.version)
            report.sent_version = str(self.version)
        else:
            if not force and version == sub.sent_version:
                return
            resp = discovery_pb2.DiscoveryResponse(
                type_url=type_url, version_info=version, nonce=nonce, resources=list(wanted.values())
            )
            sub.sent_version, sub.sent_nonce = version, nonce
            report.sent_version = version
        report.responses += 1
        report.resources_sent += len(resp.resources)
        report.bytes_sent += resp.ByteSize()
        if status.first_send_at is None:
            status.first_send_at = time.monotonic()
        await context.write(resp)


async def _drain(context: grpc.aio.ServicerContext, quiet_s: float = 0.1) -> None:
    """Read what the client sends until it is quiet for `quiet_s` (at most 1 s)."""
    reader = asyncio.ensure_future(context.read())
    deadline = time.monotonic() + 1.0
    try:
        while time.monotonic() < deadline:
            done, _ = await asyncio.wait({reader}, timeout=quiet_s)
            if not done or reader.result() is grpc.aio.EOF:
                return
            reader = asyncio.ensure_future(context.read())
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
        return
    finally:
        if not reader.done():
            reader.cancel()


class _AdsServicer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    def __init__(self, server: ManagementServer) -> None:
        self.server = server

    async def StreamAggregatedResources(self, request_iterator, context):
        await self.server.serve_stream(context, delta=False)

    async def DeltaAggregatedResources(self, request_iterator, context):
        await self.server.serve_stream(context, delta=True)


async def serve_forever(
    resources: str | Path,
    listen: str,
    poll_interval_s: float = 0.2,
    credentials: grpc.ServerCredentials | None = None,
    bearer_token: str | None = None,
    secrets: SecretIssuer | None = None,
    csr_signer: CsrSigner | None = None,
    identities: Mapping[str, tuple[str, str] | None] | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM (the `planemesh xds-server` command)."""
    server = ManagementServer(resources, poll_interval_s=poll_interval_s, bearer_token=bearer_token, secrets=secrets,
                              csr_signer=csr_signer, token_identities=identities)  # fmt: skip
    address = await server.start(listen, credentials)
    log.info(
        "ADS (SotW and Delta) on %s%s%s%s%s, resources from %s",
        address,
        " with TLS" if credentials is not None else "",
        " requiring a bearer token" if bearer_token is not None or identities else "",
        " serving SDS from the built-in CA" if secrets is not None else "",
        " and CreateCertificate" if csr_signer is not None else "",
        resources,
    )
    if server.load_error:
        log.error("serving an empty set until the files are fixed: %s", server.load_error)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await server.stop()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for flag in ("--resources", "--listen", "--tls-cert", "--tls-key", "--bearer-token-file"):
        parser.add_argument(flag, **option("xds-server", flag))
    parser.add_argument("--poll-interval", type=float, **option("xds-server", "--poll-interval"))
    add_sds_arguments(parser)
    add_auth_arguments(parser)


def run_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if not args.resources or not Path(args.resources).is_dir():
        parser.error(f"--resources {args.resources}: not a directory")
    if not 0.005 <= args.poll_interval <= 60:
        parser.error(f"--poll-interval {args.poll_interval}: expected 0.005 .. 60 seconds")
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    credentials = token = None
    try:
        if args.tls_cert is not None:
            pair = (Path(args.tls_key).read_bytes(), Path(args.tls_cert).read_bytes())
            credentials = grpc.ssl_server_credentials([pair])
        if args.bearer_token_file is not None:
            token = Path(args.bearer_token_file).read_text().strip()
    except OSError as exc:
        parser.error(f"{exc.filename}: {exc.strerror}")
    if token == "":
        parser.error(f"--bearer-token-file {args.bearer_token_file}: empty")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    secrets = issuer_from_args(parser, args)
    signer = signer_from_args(parser, args, secrets, token) if args.ca_api != "sds" else None
    if args.ca_api == "csr":
        secrets = None  # istiod's shape: certificates only by CreateCertificate
    ids = identities_from_args(parser, args)
    asyncio.run(
        serve_forever(args.resources, args.listen, args.poll_interval, credentials, token, secrets, signer, ids)
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    description = "An ADS management server serving Envoy resources from YAML/JSON files."  # not __doc__: -OO
    parser = argparse.ArgumentParser(prog="planemesh xds-server", description=description)
    add_arguments(parser)
    return run_from_args(parser, parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
