"""The `planemesh` command: a thin front over the agent, the labs, the demo and the admin socket.

Every flag, its environment variable and its default: planemesh.model.defaults, listed in
docs/configuration.md (generated from it by scripts/gen_configuration_doc.py).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from planemesh import __version__
from planemesh.agent.lean_loop import import_asyncio_without_ssl
from planemesh.agent.libc_tuning import limit_malloc_arenas
from planemesh.model.config import ConfigError
from planemesh.model.defaults import option


def env_default(name: str, default: str | None = None) -> str | None:
    """PLANEMESH_<NAME> or `default`. Kept for code written before planemesh.model.defaults: a new flag goes into
    that module's SETTINGS (tests/unit/test_configuration.py fails on a flag that is not there)."""
    return os.environ.get(f"PLANEMESH_{name.upper().replace('-', '_')}", default)


def _cmd_lab(args: argparse.Namespace) -> int:
    from planemesh.labs import load_lab

    lab = load_lab(args.file, prefix=args.prefix)
    if args.action == "up":
        lab.up()
        print(json.dumps(lab.status(), indent=2))
    elif args.action == "down":
        removed = lab.down()
        print(f"removed {len(removed)} namespaces: {' '.join(removed) or '-'}")
    else:
        print(json.dumps(lab.status(), indent=2))
    return 0


def _add_lab(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lab", help="build, inspect or tear down a network-namespace lab")
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("file", nargs="?", default=None, help="lab YAML (default: the built-in default lab)")
    p.add_argument("--prefix", **option("lab", "--prefix"))
    p.set_defaults(func=_cmd_lab)


def _columns() -> int:
    """The terminal's width as shutil.get_terminal_size finds it (COLUMNS, then stdout's terminal, else 80)."""
    try:
        if (columns := int(os.environ.get("COLUMNS", "0"))) > 0:
            return columns
    except ValueError:
        pass
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
    except (AttributeError, ValueError, OSError):
        return 80


class _Formatter(argparse.HelpFormatter):
    """argparse's help formatter given its width: without one it imports shutil (and shutil bz2, lzma, zlib: ~0.45 MB
    of the long-lived agent's RSS, docs/benchmarks.md lean4) to ask for the terminal's, at every add_argument."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24, width: int | None = None):
        super().__init__(prog, indent_increment, max_help_position, _columns() - 2 if width is None else width)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser with _Formatter; subcommands' parsers are of the same class (add_subparsers' default)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)


def build_parser(
    extra: Sequence[Callable[[argparse._SubParsersAction], None]] = (), argv: Sequence[str] | None = None
) -> argparse.ArgumentParser:
    """The parser; with `argv`, only the module of the command asked for is imported (see COMMANDS)."""
    parser = _Parser(prog="planemesh", description="multi-plane service-mesh node agent")
    parser.add_argument("--version", action="version", version=f"planemesh {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_lab(sub)
    for add in _registered_commands(_command_of(argv)):
        add(sub)
    for add in extra:
        add(sub)
    return parser


# command -> (module, function that registers it). Only the asked-for command's module is imported: the
# long-lived agent must not carry what other commands import (xds-server: grpc and protobuf, ~20 MB of RSS,
# which the agent loads only when xDS is configured).
_ADMIN = ("planemesh.agent.admin_client", "add_admin_commands")
COMMANDS: dict[str, tuple[str, str]] = {
    "agent": ("planemesh.agent.daemon", "add_agent_command"),
    "demo": ("planemesh.agent.demo", "add_demo_command"),
    "xds-server": ("planemesh.xds.cli", "add_xds_server_command"),
    "status": _ADMIN,
    "planes": _ADMIN,
    "stats": _ADMIN,
    "config-dump": _ADMIN,
    "top": ("planemesh.agent.top", "add_top_command"),
    "ca": ("planemesh.agent.identity.ca_files", "add_ca_command"),
    "hbone": ("planemesh.agent.hbone.node", "add_hbone_command"),
}


def _command_of(argv: Sequence[str] | None) -> str | None:
    """The subcommand named in argv (its first non-option word) if it is one of COMMANDS, else None (all)."""
    if argv is None:
        return None
    word = next((a for a in argv if not a.startswith("-")), None)
    return word if word in COMMANDS else None


def _registered_commands(command: str | None = None) -> list[Callable[[argparse._SubParsersAction], None]]:
    """Every command's registration function, or only `command`'s. Commands whose modules may be absent while
    the tree is being built up stay optional here."""
    wanted = [COMMANDS[command]] if command is not None else list(dict.fromkeys(COMMANDS.values()))
    adders = []
    for module, attr in wanted:
        try:
            mod = __import__(module, fromlist=[attr])
        except ImportError as exc:
            if exc.name != module:
                raise
            continue
        adders.append(getattr(mod, attr))
    return adders


def loop_tls_possible(argv: Sequence[str], env: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """The agent's own event loop does TLS (`ssl=`) only for a Kubernetes workload source
    (agent/workloads/kube_http.py), which only an xDS bootstrap configures: without one the agent loads asyncio
    without OpenSSL (agent/lean_loop.py, ~4 MB of RSS). Any `--b...` (argparse takes abbreviations) counts."""
    return bool(env.get("PLANEMESH_BOOTSTRAP")) or any(a.startswith("--b") for a in argv)


def exit_on_sigterm() -> None:
    """SIGTERM runs `finally` blocks like Ctrl-C does, so labs and demos clean up when killed politely.
    Only in this process: pyroute2 forks children to enter namespaces and stops them with SIGTERM; a child
    that unwound its copy of our stack read our netlink replies and lab set-up hung (bench runs)."""
    owner = os.getpid()

    def on_sigterm(signum: int, _frame: object) -> None:
        if os.getpid() != owner:
            os._exit(128 + signum)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)


def main(argv: Sequence[str] | None = None) -> int:
    exit_on_sigterm()
    limit_malloc_arenas()  # before any thread
    argv = sys.argv[1:] if argv is None else list(argv)
    if _command_of(argv) == "agent" and not loop_tls_possible(argv):
        import_asyncio_without_ssl()  # before the agent's modules import asyncio
    parser = build_parser(argv=argv)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"planemesh: config error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
