"""Load tests: Locust scenarios for the service, the checks on its answers, and the one
launcher for servers on 127.0.0.1 (used by the demo, the benchmarks and the tests)."""
