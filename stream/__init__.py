"""Kafka I/O, windowing, the worker runtime, state snapshots and the command line."""
