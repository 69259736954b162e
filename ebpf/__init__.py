"""planemesh.ebpf"""
