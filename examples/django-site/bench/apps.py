"""App configuration of the benchmark pages."""
from django.apps import AppConfig


class BenchConfig(AppConfig):
    name = "bench"
