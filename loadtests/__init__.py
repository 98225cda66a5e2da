"""Load tests (Locust scenarios) and the serving benchmark for the product classifier service."""
