"""Each local workload's own token for istiod's TLS port (15012), as its istio-agent would present it.

On 15012 istiod authorizes every ADS stream by its token: the token's namespace and service account must be the
proxy's (pilot/pkg/xds/auth.go; xds/server_auth.py plays it in tests). One node token cannot stand for every
pod, so with `workloads.istiod_tokens` the agent asks the API server for a token per pod (TokenRequest,
`POST /api/v1/namespaces/<ns>/serviceaccounts/<sa>/token`: audience `istio-ca` as istio-agent's projected
token, bound to the pod by name and uid so it dies with the pod, `expiration_s` long), keeps it in a private
directory (0700, files 0600, replaced atomically) and points the pod's stream at that file (read on every
(re)connect, xds/transport.py). A token is renewed at 80% of its life; a failure is logged and retried every
`RETRY_S`, the stream keeps its last token meanwhile. A pod that goes away loses its file.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from planemesh.agent.workloads.model import Workload
from planemesh.agent.workloads.settings import KubernetesSource, TokenSettings
from planemesh.agent.workloads.sources import kube_auth
from planemesh.aio import stop_tasks

RETRY_S = 10.0
MAX_TOKEN_ANSWER = 1 << 20
log = logging.getLogger("planemesh.workloads")


class TokenError(Exception):
    """A token could not be had this time (logged, retried)."""


@dataclass(frozen=True, slots=True)
class Minted:
    token: str
    lifetime_s: float  # from now until the API server's expirationTimestamp (else the requested one)


def token_request(w: Workload, settings: TokenSettings) -> dict:
    """The TokenRequest body for `w`'s service account: istiod's audience, bound to the pod when its uid is known."""
    spec: dict = {"audiences": [settings.audience], "expirationSeconds": settings.expiration_s}
    if w.uid:
        spec["boundObjectRef"] = {"apiVersion": "v1", "kind": "Pod", "name": w.name, "uid": w.uid}
    return {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}


def parse_token_answer(body: bytes, requested_s: int, now: datetime.datetime) -> Minted:
    """The API server's TokenRequest answer -> Minted. Raises TokenError naming what is wrong."""
    try:
        status = json.loads(body)["status"]
        token = status["token"]
    except (ValueError, KeyError, TypeError):
        raise TokenError("not a TokenRequest answer (no status.token)") from None
    if not isinstance(token, str) or not token or any(c in token for c in "\r\n\0 "):
        raise TokenError("status.token is not a single-line token")
    lifetime = float(requested_s)
    expiry = status.get("expirationTimestamp")
    if isinstance(expiry, str):
        try:
            lifetime = (datetime.datetime.fromisoformat(expiry.replace("Z", "+00:00")) - now).total_seconds()
        except ValueError:
            raise TokenError(f"status.expirationTimestamp {expiry!r} is not a time") from None
    return Minted(token, max(lifetime, 0.0))


class PodTokens:
    """The token files of the node's workloads: `path(w)` for its stream, `keep(w)` while it runs."""

    def __init__(self, kube: KubernetesSource, settings: TokenSettings, timeout_s: float = 10.0) -> None:
        self.kube, self.settings, self.timeout_s = kube, settings, timeout_s
        self.dir = Path(settings.dir)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._first: dict[str, asyncio.Event] = {}
        self.minted = self.failures = 0

    def path(self, w: Workload) -> str:
        return str(self.dir / f"{w.namespace}.{w.name}")

    def _post(self, w: Workload) -> bytes:
        headers, context = kube_auth(self.kube, TokenError)
        headers["Content-Type"] = "application/json"
        url = f"{self.kube.api}/api/v1/namespaces/{w.namespace}/serviceaccounts/{w.service_account}/token"
        body = json.dumps(token_request(w, self.settings)).encode()
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s, context=context) as resp:
                return resp.read(MAX_TOKEN_ANSWER)
        except urllib.error.HTTPError as exc:
            raise TokenError(f"POST {url}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise TokenError(f"POST {url}: {getattr(exc, 'reason', exc)}") from None

    def _write(self, w: Workload, token: str) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".token-")  # 0600
        try:
            with os.fdopen(fd, "w") as f:
                f.write(token + "\n")
            os.replace(tmp, self.path(w))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    async def mint(self, w: Workload) -> Minted:
        body = await asyncio.to_thread(self._post, w)
        minted = parse_token_answer(body, self.settings.expiration_s, datetime.datetime.now(datetime.UTC))
        await asyncio.to_thread(self._write, w, minted.token)
        self.minted += 1
        return minted

    async def _keep(self, w: Workload) -> None:
        while True:
            try:
                minted = await self.mint(w)
                delay = max(minted.lifetime_s * 0.8, 1.0)
            except (TokenError, OSError) as exc:
                self.failures += 1
                log.warning("workload %s: no istiod token (retried in %g s): %s", w.key, RETRY_S, exc)
                delay = RETRY_S
            self._first[w.key].set()
            await asyncio.sleep(delay)

    def keep(self, w: Workload) -> None:
        """Mint `w`'s token now and renew it until `forget(w)`."""
        self._first[w.key] = asyncio.Event()
        self._tasks[w.key] = asyncio.get_running_loop().create_task(self._keep(w), name=f"token-{w.key}")

    async def first(self, w: Workload) -> None:
        """Until the first attempt for `w` has ended (its stream then connects with the token, or retries)."""
        await self._first[w.key].wait()

    async def forget(self, w: Workload) -> None:
        self._first.pop(w.key, None)
        await stop_tasks(self._tasks.pop(w.key, None))
        with contextlib.suppress(OSError):
            os.unlink(self.path(w))


__all__ = ["PodTokens", "TokenError", "parse_token_answer", "token_request"]
