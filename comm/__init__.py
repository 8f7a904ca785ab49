"""Topology, process groups and every call into torch.distributed. Imports nothing of ours."""
