"""planemesh: a node-level, multi-plane service-mesh agent.

The repository's top-level folders (agent/, ebpf/, netplanes/, xds/, labs/) are the subpackages
planemesh.agent, planemesh.ebpf, ... (see pyproject.toml).
"""

__version__ = "0.1.0"
