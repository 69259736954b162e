"""The management server's resource sets from code and per node (xds/server.py): packing and `nodes/` dirs."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from google.protobuf import any_pb2, message

from planemesh.xds.resources import SHORT_NAME, ResourceError, load_resource_dir, message_class, pack, resource_name

NODES_DIR = "nodes"  # <resources>/nodes/<node id or pod.ns>/*.yaml: per-node resources


def packed(type_url: str, messages: Iterable[message.Message]) -> dict[str, any_pb2.Any]:
    cls = message_class(type_url)
    if cls is None:
        raise ResourceError(type_url, "unknown resource type URL")
    items: dict[str, any_pb2.Any] = {}
    for i, msg in enumerate(messages):
        where = f"{SHORT_NAME.get(type_url, type_url)}[{i}]"
        if not isinstance(msg, cls):
            raise ResourceError(where, f"a {type(msg).__name__} is not a {cls.__name__}")
        name = resource_name(msg)
        if not name:
            raise ResourceError(where, "resource has no name")
        if name in items:
            raise ResourceError(where, f"duplicate name {name!r}")
        items[name] = pack(msg)
    return items


def load_node_dirs(nodes: Path) -> dict[str, dict[str, dict[str, any_pb2.Any]]]:
    """`nodes/<key>/` directories -> {key: {type: {name: Any}}}; errors name the directory."""
    if not nodes.is_dir():
        return {}
    out = {}
    for path in sorted(nodes.iterdir()):
        if path.is_dir() and not path.name.startswith("."):
            try:
                out[path.name] = load_resource_dir(path)
            except ResourceError as exc:
                raise ResourceError(f"{NODES_DIR}/{path.name}/{exc.where}", exc.reason) from None
    return out
