"""planemesh.agent.proxy"""
