"""corral: a production application server for Python web apps on Linux.

It supervises an app's workers over FastCGI, runs the app's deploy step once
per generation, serves static files itself and answers HTTP/1.1 clients.
"""

__version__ = "0.1.0"
