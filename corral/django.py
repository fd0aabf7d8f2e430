"""A WSGI callable for a Django project that has no wsgi.py of its own."""

from django.core.wsgi import get_wsgi_application

application = get_wsgi_application()
