"""Run one fuzz target under atheris (coverage-guided, libFuzzer):

    python -m tests.fuzz.run TARGET [libFuzzer options] [CORPUS_DIR ...]

e.g. `python -m tests.fuzz.run http1 -max_total_time=60 /tmp/new tests/fuzz/corpus/http1`: new inputs go to the
first directory, the others are read as seeds. A finding (an exception out of the target) stops the run with
a non-zero exit and a `crash-*` file (see -artifact_prefix). The pytest test and `python -m bench fuzz` run
this in a subprocess, since libFuzzer ends the process when it is done.
"""

from __future__ import annotations

import sys

import atheris


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        sys.exit("usage: python -m tests.fuzz.run TARGET [libFuzzer options] [CORPUS_DIR ...]")
    name = argv[1]
    from tests.fuzz.targets import INSTRUMENT, TARGETS

    if name not in TARGETS:
        sys.exit(f"unknown target {name!r}; targets: {', '.join(TARGETS)}")
    import importlib

    for module in INSTRUMENT[name]:  # already imported by targets: instrument their code in place
        mod = importlib.import_module(module)
        _instrument_module(mod)
    target = TARGETS[name]
    target(b"")  # build the target's fixtures before fuzzing starts (not part of any input's cost)
    atheris.Setup([argv[0], *argv[2:]], target)
    atheris.Fuzz()


def _instrument_module(mod) -> None:
    """Coverage instrumentation of every function of a module (and of a package's loaded submodules)."""
    import types

    prefix = mod.__name__ + "."
    modules = [mod, *(m for n, m in list(sys.modules.items()) if n.startswith(prefix) and m is not None)]
    for module in modules:
        for value in list(vars(module).values()):
            if isinstance(value, types.FunctionType) and value.__module__ == module.__name__:
                atheris.instrument_func(value)
            elif isinstance(value, type) and value.__module__ == module.__name__:
                for member in list(vars(value).values()):
                    if isinstance(member, types.FunctionType):
                        atheris.instrument_func(member)  # patches the code object in place


if __name__ == "__main__":
    main(sys.argv)
