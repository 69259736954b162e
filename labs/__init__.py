"""planemesh.labs"""
