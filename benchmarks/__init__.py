"""Benchmark suites and the Discord simulator they (and the tests) run against."""
