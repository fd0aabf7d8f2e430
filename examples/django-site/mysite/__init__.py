"""Project package of the sample site: settings, URLs, WSGI entry point, home page."""
