"""Admin screen for bench hits (read-only use: to see what /bench/db stored)."""
from django.contrib import admin

from .models import Hit

admin.site.register(Hit, list_display=["id", "stamp", "created"])
