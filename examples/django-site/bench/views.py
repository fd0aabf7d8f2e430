"""The two benchmark pages (kept minimal on purpose): the time, and the time stored then shown."""
from datetime import datetime

from django.shortcuts import render

from .models import Hit


def now_text():
    return datetime.now().strftime("%Y-%m-%d %H:%M:%S.%f")


def time(request):
    return render(request, "bench/time.html", {"now": now_text()})


def db(request):
    hit = Hit.objects.create(stamp=now_text())
    return render(request, "bench/time.html", {"now": hit.stamp})
