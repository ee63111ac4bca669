"""Timing a runner, its statistics, and the report."""
