"""planemesh.xds"""
