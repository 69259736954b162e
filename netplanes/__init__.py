"""planemesh.netplanes"""
