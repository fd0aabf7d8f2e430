"""Views of __project__; start your own apps with `python manage.py startapp NAME`."""
import django
from django.shortcuts import render


def home(request):
    return render(request, "home.html", {"django_version": django.get_version()})
