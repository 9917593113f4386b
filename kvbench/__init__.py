"""kvbench: a benchmark and leaderboard harness for KV-cache eviction."""

__version__ = "0.1.0"
