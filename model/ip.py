"""IP addresses and networks of the model and the proxy: the part of netaddr's IPAddress/IPNetwork (1.x) the
product uses, parsed and written by the C library's inet_pton/inet_ntop as netaddr does (the stdlib's `ipaddress`
only for a dotted netmask). netaddr cost every process (the agent and each worker) ~1.5-2 MB of RSS, its `eui`
module pulling importlib.resources, tempfile, bz2 and lzma (docs/benchmarks.md, lean4).

netaddr's semantics are kept where the product relies on them (tests/unit/test_model_ip.py checks each against
netaddr): a network keeps the address it was written with (`.ip`, `str()`), `.cidr` is its normalised form,
equality, hash and order compare (version, first, last), so 10.0.0.5/24 == 10.0.0.0/24; `in` is False across
versions; text is parsed strictly (no scope id, no leading zeros, no implicit prefix) and IPv6 is written as
inet_ntop writes it (`::ffff:10.0.0.1`). Values are plain ints, computed once: containment is two comparisons.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

_FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}
_BITS = {4: 32, 6: 128}
_MAPPED_PREFIX = 0xFFFF << 32  # ::ffff:0:0/96


class AddrFormatError(ValueError):
    """Text that is not an address or network (netaddr's name; also a ValueError)."""


def _parse(text: str, what: str) -> tuple[int, int]:
    """(version, value) of an address in text; inet_pton's rules (netaddr's INET_PTON)."""
    try:
        if ":" in text:
            return 6, int.from_bytes(socket.inet_pton(socket.AF_INET6, text), "big")
        return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big")
    except (OSError, ValueError, TypeError):
        raise AddrFormatError(f"failed to detect a valid {what} from {text!r}") from None


def _text(version: int, value: int) -> str:
    return socket.inet_ntop(_FAMILY[version], value.to_bytes(_BITS[version] // 8, "big"))


class IPAddress:
    """One IPv4 or IPv6 address."""

    __slots__ = ("value", "version")

    def __init__(self, addr: str | int | IPAddress, version: int | None = None) -> None:
        if isinstance(addr, IPAddress):
            self.version, self.value = addr.version, addr.value
        elif isinstance(addr, str):
            if "/" in addr:
                raise ValueError("IPAddress() does not support netmasks or subnet prefixes")
            self.version, self.value = _parse(addr, "IP address")
        elif isinstance(addr, int) and not isinstance(addr, bool) and 0 <= addr < 1 << 128:
            self.version = version or (4 if addr < 1 << 32 else 6)
            if addr >= 1 << _BITS[self.version]:
                raise AddrFormatError(f"{addr} is not an IPv{self.version} address")
            self.value = addr
        else:
            raise TypeError(f"unsupported address {addr!r}")

    def __int__(self) -> int:
        return self.value

    def is_ipv4_mapped(self) -> bool:
        return self.version == 6 and self.value >> 32 == 0xFFFF

    def ipv4(self) -> IPAddress:
        """The IPv4 address (of an IPv4-mapped IPv6 one); AddrFormatError for other IPv6 addresses."""
        if self.version == 4:
            return self
        if not self.is_ipv4_mapped():
            raise AddrFormatError(f"{self} cannot be converted to an IPv4 address")
        return IPAddress(self.value & 0xFFFFFFFF, 4)

    def __str__(self) -> str:
        return _text(self.version, self.value)

    def __repr__(self) -> str:
        return f"IPAddress('{self}')"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IPAddress) and self.version == other.version and self.value == other.value

    def __lt__(self, other: IPAddress) -> bool:
        return (self.version, self.value) < (other.version, other.value)

    def __hash__(self) -> int:
        return hash((self.version, self.value))

    def __reduce__(self) -> tuple[Any, ...]:  # pickled small: the agent sends snapshots to its workers
        return (IPAddress, (self.value, self.version))


def _prefix(version: int, prefix: str, value: str) -> int:
    """A prefix length, or a netmask as netaddr takes one ("10.0.0.0/255.255.0.0")."""
    if prefix.isascii() and prefix.isdigit() and int(prefix) <= _BITS[version]:
        return int(prefix)
    try:
        return ipaddress.ip_network(f"{'0.0.0.0' if version == 4 else '::'}/{prefix}").prefixlen
    except ValueError:
        raise AddrFormatError(f"invalid IPNetwork {value}") from None


class IPNetwork:
    """An address with a prefix length ("10.0.0.5/24"); `.cidr` is the network it lies in (10.0.0.0/24)."""

    __slots__ = ("_value", "first", "last", "prefixlen", "version")

    def __init__(self, value: str | IPNetwork, flags: int = 0) -> None:  # flags: netaddr's, 0 is all we use
        if isinstance(value, IPNetwork):
            self._set(value.version, value._value, value.prefixlen)
            return
        if not isinstance(value, str):
            raise TypeError(f"unsupported network {value!r}")
        address, slash, prefix = value.partition("/")
        try:
            version, ip = _parse(address, "IP network")
        except AddrFormatError:
            raise AddrFormatError(f"invalid IPNetwork {value}") from None
        self._set(version, ip, _prefix(version, prefix, value) if slash else _BITS[version])

    def _set(self, version: int, value: int, prefixlen: int) -> None:
        host = (1 << (_BITS[version] - prefixlen)) - 1
        self.version, self.prefixlen, self._value = version, prefixlen, value
        self.first, self.last = value & ~host, value | host

    @property
    def ip(self) -> IPAddress:
        return IPAddress(self._value, self.version)

    @property
    def cidr(self) -> IPNetwork:
        out = IPNetwork.__new__(IPNetwork)
        out._set(self.version, self.first, self.prefixlen)
        return out

    @property
    def size(self) -> int:
        return self.last - self.first + 1

    @property
    def network(self) -> IPAddress:
        return IPAddress(self.first, self.version)

    def __getitem__(self, index: int) -> IPAddress:
        if not -self.size <= index < self.size:
            raise IndexError("index out range for address range size!")
        return IPAddress((self.first if index >= 0 else self.last + 1) + index, self.version)

    def __contains__(self, other: object) -> bool:
        if isinstance(other, IPAddress):
            return other.version == self.version and self.first <= other.value <= self.last
        if isinstance(other, IPNetwork):
            return other.version == self.version and self.first <= other.first and other.last <= self.last
        return False

    def __str__(self) -> str:
        return f"{_text(self.version, self._value)}/{self.prefixlen}"

    def __repr__(self) -> str:
        return f"IPNetwork('{self}')"

    def key(self) -> tuple[int, int, int]:
        return (self.version, self.first, self.last)

    def sort_key(self) -> tuple[int, int, int, int]:
        """netaddr's order: version, network address, prefix length, then the host bits."""
        return (self.version, self.first, self.prefixlen, self._value - self.first)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IPNetwork) and self.key() == other.key()

    def __lt__(self, other: IPNetwork) -> bool:
        return self.sort_key() < other.sort_key()

    def __hash__(self) -> int:
        return hash(self.key())

    def __reduce__(self) -> tuple[Any, ...]:
        return (IPNetwork, (str(self),))
