"""Execution: what a worker does with a claimed job (the runner, leases and heartbeats)."""
