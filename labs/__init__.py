"""planemesh labs: network-namespace test beds declared in YAML (the node is a namespace too)."""

from planemesh.labs.lab import Lab, default_lab_path, load_lab

__all__ = ["Lab", "default_lab_path", "load_lab"]
