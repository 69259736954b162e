"""planemesh.agent"""
