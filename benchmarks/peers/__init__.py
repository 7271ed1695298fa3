"""Peer programs the benchmarks run as subprocesses (third-party clients against the simulator)."""
