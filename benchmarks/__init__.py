"""Measurements of the whole product (`make bench-*`, `make soak`, `make container-check`); not installed."""
