"""pickle's C implementation (`_pickle`) without `pickle.py`: that module also defines a pure-Python pickler and
unpickler beside the C ones it re-exports, ~0.2 MB of RSS in every process that imports it (the agent and each
worker: bench/footprint.py), and the product only uses the C ones (the worker channel, the netlink and YAML
helpers). Where there is no `_pickle` (not CPython), the `pickle` module's."""

from __future__ import annotations

try:
    from _pickle import Pickler, Unpickler, UnpicklingError, dumps, load, loads
except ImportError:  # pragma: no cover - CPython always has _pickle
    from pickle import Pickler, Unpickler, UnpicklingError, dumps, load, loads

HIGHEST_PROTOCOL = 5  # pickle.HIGHEST_PROTOCOL since Python 3.8 (protocol 5: out-of-band buffers)

__all__ = ["HIGHEST_PROTOCOL", "Pickler", "Unpickler", "UnpicklingError", "dumps", "load", "loads"]
