"""Deploy step of __project__: corral runs it with the project's interpreter
once each time it starts, before the first request (its output goes to
log/deploy.log).  Add what a new version needs before it serves."""
import os

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "__project__.settings")
django.setup()

from django.core.management import call_command  # noqa: E402  (needs django.setup())

if __name__ == "__main__":
    print("deploy: migrate")
    call_command("migrate", interactive=False, verbosity=1)
    print("deploy: collectstatic")
    call_command("collectstatic", interactive=False, verbosity=1)
    print("deploy: done")
