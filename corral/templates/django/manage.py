#!/usr/bin/env python
"""Django's command line for __project__ (migrate, createsuperuser, shell, ...):
run it with the project's own interpreter, .venv/bin/python manage.py ..."""
import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "__project__.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
