"""The WSGI entry point corral's workers load: `__project__.wsgi:application`."""
import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "__project__.settings")
application = get_wsgi_application()
