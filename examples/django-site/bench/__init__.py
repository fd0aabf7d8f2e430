"""Bench app: the two minimal pages used for performance tests."""
