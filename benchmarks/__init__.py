"""Benchmarks of jaxmoe: python -m benchmarks.<name> [--json PATH] [--quick]."""
