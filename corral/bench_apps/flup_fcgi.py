"""Serves a WSGI app with flup's prefork FastCGI server on a unix socket, for
`corral bench`'s "nginx -> flup" arrangement (the original's nginx + FastCGI).

    python -m corral.bench_apps.flup_fcgi module:callable --socket PATH --processes N
"""

from __future__ import annotations

import argparse
import importlib


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m corral.bench_apps.flup_fcgi",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("app", help="the WSGI callable, as module:callable")
    parser.add_argument("--socket", required=True, help="the unix socket to listen on")
    parser.add_argument("--processes", type=int, default=2, help="worker processes")
    args = parser.parse_args(argv)
    from flup.server.fcgi_fork import WSGIServer  # the bench checks it is installed

    module, _, attr = args.app.partition(":")
    app = importlib.import_module(module)
    for part in attr.split("."):
        app = getattr(app, part)
    n = args.processes
    # flup's prefork server keeps between maxSpare and maxChildren children:
    # with all three equal it keeps exactly n, as every other arrangement does.
    WSGIServer(app, bindAddress=args.socket, minSpare=n, maxSpare=n, maxChildren=n,
               debug=False).run()


if __name__ == "__main__":
    main()
