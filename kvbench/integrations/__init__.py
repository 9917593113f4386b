"""Integrations with other tools: lm-evaluation-harness."""
