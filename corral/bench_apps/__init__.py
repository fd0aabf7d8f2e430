"""Small programs `corral bench` runs: the plain WSGI hello app, and a launcher
for flup's FastCGI server (the original's "nginx + FastCGI" arrangement)."""
