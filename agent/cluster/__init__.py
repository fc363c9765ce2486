"""Cluster membership: who the other agents are and how to reach them."""
