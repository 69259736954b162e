"""Compile and load BPF programs in a short-lived helper process; the caller keeps only fds.

bcc pulls LLVM/clang into the process that imports it (~75 MB, more once a program is compiled, and it
stays mapped). So the agent never imports bcc: `load(spec, pin_dir)` runs `python -m planemesh.ebpf.build`
with the spec on stdin and one end of a unix socketpair; the helper compiles and loads with bcc, sends
the program and map fds back over the socket (SCM_RIGHTS) and exits.

With a pin directory the helper also pins each program as `<pin_dir>/prog_<program>_<hash>`, the hash
covering the source, every header next to it, the cflags, the program list and the kernel release. The
next `load` with the same spec finds those pins and compiles nothing: it opens the programs and the
pinned maps with BPF_OBJ_GET and checks that the programs use exactly those maps (a map pin replaced
under a program pin means recompile). The maps are pinned by the programs themselves (pm_maps.h), so a
recompiled program re-adopts them as before.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# CPython's own SHA-256 (the same digest): hashlib's would map OpenSSL's libcrypto into the agent (~3.4 MB RSS).
try:
    from _sha256 import sha256  # CPython <= 3.11
except ImportError:  # pragma: no cover - CPython >= 3.12
    from _sha2 import sha256

from planemesh import module_argv
from planemesh.ebpf import libbpf

log = logging.getLogger("planemesh.ebpf.build")

EBPF_DIR = Path(__file__).resolve().parent
PROG_PIN_PREFIX = "prog_"
HELPER_TIMEOUT_S = 120.0  # a cold compile takes 1-3 s on a 2-core VM; bound a wedged helper
_MAX_FDS = 64


class BuildError(RuntimeError):
    """The helper could not compile, load or hand back the programs."""


def kernel_release() -> str:
    return os.uname().release


@dataclass(frozen=True, slots=True)
class ProgramSpec:
    """What to build: one source, its cflags, its programs (name, bcc prog type name, expected attach
    type or None) and the maps to hand back by name."""

    source: Path
    cflags: tuple[str, ...]
    programs: tuple[tuple[str, str, int | None], ...]
    maps: tuple[str, ...] = ()

    def digest(self) -> str:
        """Content hash: source, headers, cflags, programs, kernel release (16 hex digits)."""
        h = sha256()
        for path in [self.source, *sorted(Path(p) for p in glob.glob(str(self.source.parent / "*.h")))]:
            h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
        h.update(json.dumps([list(self.cflags), [list(p) for p in self.programs], kernel_release()]).encode())
        return h.hexdigest()[:16]

    def to_json(self) -> str:
        return json.dumps(
            {"source": str(self.source), "cflags": list(self.cflags), "programs": self.programs, "maps": self.maps}
        )

    @classmethod
    def from_json(cls, text: str) -> ProgramSpec:
        raw = json.loads(text)
        programs = tuple((str(n), str(t), None if a is None else int(a)) for n, t, a in raw["programs"])
        return cls(Path(raw["source"]), tuple(raw["cflags"]), programs, tuple(raw["maps"]))


@dataclass
class Loaded:
    """Fds owned by the caller: programs and maps by name. `compiled`: False when pins were re-used."""

    programs: dict[str, int] = field(default_factory=dict)
    maps: dict[str, int] = field(default_factory=dict)
    compiled: bool = True

    def close(self) -> None:
        for fd in [*self.programs.values(), *self.maps.values()]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.programs.clear()
        self.maps.clear()


def prog_pin_path(pin_dir: str, program: str, digest: str) -> str:
    return os.path.join(pin_dir, f"{PROG_PIN_PREFIX}{program}_{digest}")


# ---- the caller's side ------------------------------------------------------------------------------
def load(spec: ProgramSpec, pin_dir: str | None = None) -> Loaded:
    """The spec's programs and maps as fds: re-used from pins when they match, else built by the helper."""
    digest = spec.digest()
    if pin_dir:
        reused = _reuse(spec, pin_dir, digest)
        if reused is not None:
            log.info("re-used pinned %s (hash %s): nothing compiled", spec.source.name, digest)
            return reused
    started = time.monotonic()
    loaded = _run_helper(spec, pin_dir, digest)
    log.info("compiled %s in a helper process (%.2f s, hash %s)", spec.source.name, time.monotonic() - started, digest)
    if pin_dir:
        remove_stale_pins(pin_dir, spec, keep=digest)
    return loaded


def _reuse(spec: ProgramSpec, pin_dir: str, digest: str) -> Loaded | None:
    loaded = Loaded(compiled=False)
    try:
        for name, _type, _attach in spec.programs:
            loaded.programs[name] = libbpf.obj_get(prog_pin_path(pin_dir, name, digest))
        for name in spec.maps:
            loaded.maps[name] = libbpf.obj_get(os.path.join(pin_dir, name))
        pinned = {libbpf.map_info(fd)[1] for fd in loaded.maps.values()}
        for name, fd in loaded.programs.items():
            used = set(libbpf.prog_map_ids(fd))
            if not used <= pinned:
                log.info("pinned %s uses maps that are no longer pinned: recompiling", name)
                loaded.close()
                return None
    except OSError:
        loaded.close()
        return None
    return loaded


def remove_stale_pins(pin_dir: str, spec: ProgramSpec, keep: str | None = None) -> None:
    """Unpin this spec's programs of other hashes (or all of them, keep=None). A program still attached
    somewhere lives on until it is replaced there."""
    for name, _type, _attach in spec.programs:
        for path in glob.glob(os.path.join(glob.escape(pin_dir), f"{PROG_PIN_PREFIX}{name}_*")):
            if keep is None or path != prog_pin_path(pin_dir, name, keep):
                with contextlib.suppress(OSError):
                    os.unlink(path)


def remove_program_pins(pin_dir: str) -> None:
    """Unpin every program `load` pinned in pin_dir (any spec, any hash)."""
    for path in glob.glob(os.path.join(glob.escape(pin_dir), f"{PROG_PIN_PREFIX}*")):
        with contextlib.suppress(OSError):
            os.unlink(path)


def _run_helper(spec: ProgramSpec, pin_dir: str | None, digest: str) -> Loaded:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    request = json.dumps({"spec": spec.to_json(), "pin_dir": pin_dir, "digest": digest})
    with ours:
        try:
            proc = subprocess.Popen(
                module_argv("planemesh.ebpf.build", str(theirs.fileno())),
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                pass_fds=(theirs.fileno(),),
            )
        finally:
            theirs.close()
        try:
            _, stderr = proc.communicate(request.encode(), timeout=HELPER_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            proc.kill()
            proc.wait()
            raise BuildError(f"compiling {spec.source.name} took over {HELPER_TIMEOUT_S:.0f} s") from exc
        try:
            ours.setblocking(False)
            data, fds, _flags, _addr = socket.recv_fds(ours, 1 << 16, _MAX_FDS)
        except OSError:
            data, fds = b"", []
    return _decode_reply(spec, data, fds, proc.returncode, stderr.decode(errors="replace"))


def _decode_reply(spec: ProgramSpec, data: bytes, fds: list[int], rc: int, stderr: str) -> Loaded:
    """The helper's reply: {"programs": [...], "maps": [...]} naming the fds in order, exactly the spec's."""
    try:
        reply = json.loads(data) if data else {}
    except ValueError:
        reply = None
    programs, maps = [p[0] for p in spec.programs], list(spec.maps)
    ok = isinstance(reply, dict) and reply.get("programs") == programs and reply.get("maps") == maps
    if rc != 0 or not ok or len(fds) != len(programs) + len(maps):
        for fd in fds:
            os.close(fd)
        error = reply.get("error") if isinstance(reply, dict) else None
        why = error or (stderr.strip().splitlines() or [f"helper exited with {rc} and no usable reply"])[-1]
        raise BuildError(f"cannot load {spec.source.name}: {why}")
    return Loaded(
        programs=dict(zip(programs, fds[: len(programs)], strict=True)),
        maps=dict(zip(maps, fds[len(programs) :], strict=True)),
        compiled=True,
    )


# ---- the helper's side (a separate process: bcc is imported here only) -------------------------------
def _build(spec: ProgramSpec, pin_dir: str | None, digest: str) -> tuple[list[str], list[str], list[int], object]:
    from bcc import BPF

    bpf = BPF(src_file=str(spec.source).encode(), cflags=list(spec.cflags))
    prog_fds = []
    for name, type_name, attach in spec.programs:
        kwargs = {"attach_type": attach} if attach is not None else {}
        fn = bpf.load_func(name.encode(), getattr(BPF, type_name), **kwargs)
        prog_fds.append(fn.fd)
        if pin_dir:
            path = prog_pin_path(pin_dir, name, digest)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # a pin of this hash whose maps were replaced: this build supersedes it
            libbpf.obj_pin(fn.fd, path)
    map_fds = [int(bpf[name.encode()].map_fd) for name in spec.maps]
    return [p[0] for p in spec.programs], list(spec.maps), prog_fds + map_fds, bpf


def helper_main(sock_fd: int) -> int:
    with socket.socket(fileno=sock_fd) as sock:
        try:
            request = json.loads(sys.stdin.read())
            spec = ProgramSpec.from_json(request["spec"])
            programs, maps, fds, _bpf = _build(spec, request.get("pin_dir"), request["digest"])
        except Exception as exc:  # everything goes back to the caller as one line
            sock.send(json.dumps({"error": f"{type(exc).__name__}: {exc}"[:2000]}).encode())
            return 1
        socket.send_fds(sock, [json.dumps({"programs": programs, "maps": maps}).encode()], fds)
    return 0


__all__ = ["BuildError", "Loaded", "ProgramSpec", "load", "prog_pin_path", "remove_program_pins", "remove_stale_pins"]


if __name__ == "__main__":
    sys.exit(helper_main(int(sys.argv[1])))
