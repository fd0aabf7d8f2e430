"""The __project__ Django project (settings, URLs, views), made by `corral new django`."""
