"""Bench URLs: /bench/time and /bench/db (no trailing slash, as in the original test)."""
from django.urls import path

from . import views

urlpatterns = [
    path("time", views.time, name="bench-time"),
    path("db", views.db, name="bench-db"),
]
