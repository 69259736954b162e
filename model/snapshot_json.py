"""Generic conversion between the config dataclasses and JSON-safe values, both ways.

`to_jsonable` walks any value (dataclasses, mappings, tuples, frozensets, enums, model/ip.py's addresses and
networks, bytes) without knowing the classes; `from_jsonable` rebuilds a typed value from the dataclass type hints,
so a `/config_dump` can be read back into a `Snapshot` and compared. Pure functions, no I/O.

Encoding rules: dataclass -> object of all its fields; Mapping -> object (keys as strings); tuple/list ->
array; set/frozenset -> sorted array; Enum -> its value; IPNetwork/IPAddress -> string; bytes -> string
when UTF-8, else {"base64": "..."}; non-finite floats -> "inf"/"-inf"/"nan" strings.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import math
import types
import typing
from collections.abc import Mapping
from typing import Any

from planemesh.model.ip import IPAddress, IPNetwork


class DecodeError(ValueError):
    """JSON that does not fit the type; `path` names the field (`listeners[2].port`)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path or '<root>'}: {message}")
        self.path = path


def to_jsonable(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | str):
        return value.value if isinstance(value, enum.Enum) else value
    if isinstance(value, enum.Enum):
        return to_jsonable(value.value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {  # a field marked redact (private keys: model/tls_config.py) is never written out
            f.name: "[redacted]" if f.metadata.get("redact") else to_jsonable(getattr(value, f.name))
            for f in dataclasses.fields(value)
        }
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, IPNetwork | IPAddress):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        try:
            return raw.decode()
        except UnicodeDecodeError:
            return {"base64": base64.b64encode(raw).decode()}
    if isinstance(value, set | frozenset):
        return sorted((to_jsonable(v) for v in value), key=lambda v: (type(v).__name__, str(v)))
    if isinstance(value, tuple | list):
        return [to_jsonable(v) for v in value]
    raise TypeError(f"cannot convert {type(value).__name__} to JSON")


# ---- decoding ------------------------------------------------------------------------------------


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _decode_union(tp: Any, data: Any, path: str) -> Any:
    members = typing.get_args(tp)
    if data is None and type(None) in members:
        return None
    candidates = [m for m in members if m is not type(None)]
    if isinstance(data, dict):
        # A union of dataclasses (e.g. HttpFilter): the member whose field names are exactly the keys.
        for member in candidates:
            if dataclasses.is_dataclass(member) and {f.name for f in dataclasses.fields(member)} == set(data):
                return from_jsonable(member, data, path)
    errors = []
    for member in candidates:
        try:
            return from_jsonable(member, data, path)
        except DecodeError as exc:
            errors.append(str(exc))
    raise DecodeError(path, f"matches none of {', '.join(getattr(m, '__name__', str(m)) for m in members)}")


def _decode_float(data: Any, path: str) -> float:
    if isinstance(data, str) and data in ("inf", "-inf", "nan"):
        return float(data)
    if isinstance(data, bool) or not isinstance(data, int | float):
        raise DecodeError(path, f"expected a number, got {data!r}")
    return float(data)


def from_jsonable(tp: Any, data: Any, path: str = "") -> Any:
    """Rebuild a value of type `tp` from what `to_jsonable` produced."""
    if tp is Any:
        return data
    if _is_union(tp):
        return _decode_union(tp, data, path)
    origin = typing.get_origin(tp)
    if origin is not None:
        args = typing.get_args(tp)
        if origin is tuple:
            if not isinstance(data, list):
                raise DecodeError(path, f"expected an array, got {type(data).__name__}")
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(from_jsonable(args[0], v, f"{path}[{i}]") for i, v in enumerate(data))
            if len(args) != len(data):
                raise DecodeError(path, f"expected {len(args)} items, got {len(data)}")
            return tuple(from_jsonable(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, data, strict=True)))
        if origin in (frozenset, set, list):
            if not isinstance(data, list):
                raise DecodeError(path, f"expected an array, got {type(data).__name__}")
            return origin(from_jsonable(args[0], v, f"{path}[{i}]") for i, v in enumerate(data))
        if origin in (Mapping, dict, typing.Mapping) or (isinstance(origin, type) and issubclass(origin, Mapping)):
            if not isinstance(data, dict):
                raise DecodeError(path, f"expected an object, got {type(data).__name__}")
            decoded = {k: from_jsonable(args[1], v, f"{path}.{k}") for k, v in data.items()}
            return types.MappingProxyType(decoded) if origin is not dict else decoded
        raise DecodeError(path, f"unsupported type {tp!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(data, dict):
            raise DecodeError(path, f"expected an object for {tp.__name__}, got {type(data).__name__}")
        hints = _hints(tp)
        names = {f.name for f in dataclasses.fields(tp)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise DecodeError(f"{path}.{unknown[0]}", f"unknown field of {tp.__name__}")
        kwargs = {k: from_jsonable(hints[k], v, f"{path}.{k}" if path else k) for k, v in data.items()}
        try:
            return tp(**kwargs)
        except TypeError as exc:
            raise DecodeError(path, str(exc)) from exc
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(data)
        except ValueError:
            raise DecodeError(path, f"{data!r} is not one of {', '.join(str(m.value) for m in tp)}") from None
    if tp is IPNetwork or tp is IPAddress:
        try:
            return tp(data)
        except Exception as exc:
            raise DecodeError(path, f"{data!r} is not a valid {tp.__name__}") from exc
    if tp is bytes:
        if isinstance(data, str):
            return data.encode()
        if isinstance(data, dict) and set(data) == {"base64"}:
            return base64.b64decode(data["base64"])
        raise DecodeError(path, f"expected a string or {{'base64': ...}}, got {data!r}")
    if tp is float:
        return _decode_float(data, path)
    if tp is bool or tp is int or tp is str:
        if type(data) is not tp and not (tp is float and type(data) is int):
            raise DecodeError(path, f"expected {tp.__name__}, got {data!r}")
        return data
    if tp is type(None):
        if data is not None:
            raise DecodeError(path, f"expected null, got {data!r}")
        return None
    raise DecodeError(path, f"unsupported type {tp!r}")
