"""App configuration of the store."""
from django.apps import AppConfig


class StoreConfig(AppConfig):
    name = "store"
