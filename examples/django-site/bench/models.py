"""Bench data: one row per /bench/db request, holding the rendered time."""
from django.db import models


class Hit(models.Model):
    stamp = models.CharField(max_length=32)
    created = models.DateTimeField(auto_now_add=True)

    def __str__(self):
        return self.stamp
