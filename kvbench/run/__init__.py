"""Drivers: the runner that turns samples into result rows, and sweeps (shards, resume)."""
