"""The deterministic simulation harness: the same protocol code, virtual network and time."""

from pollen.sim.network import NetworkConfig, NetworkStats
from pollen.sim.simulation import Simulation, TrafficReport, placement_swarm

__all__ = ["NetworkConfig", "NetworkStats", "Simulation", "TrafficReport", "placement_swarm"]
