"""The `corral` command: parses arguments and composes the layers; it holds
no logic of its own beyond choosing the event loop and the logging setup.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from corral import __version__
from corral.config import Bind, ConfigError, load
from corral.settings import BY_NAME


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s corral[%(process)d] %(levelname)s %(message)s"))
    logger = logging.getLogger("corral")
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def raise_open_file_limit() -> int:
    """Raise our soft limit on open files to the hard limit: each client
    holds a descriptor, and the usual soft limit of 1024 is far below what
    the front can hold.  Returns the limit now in force."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def run(coro):
    """Run on uvloop when it is installed, else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def cmd_serve(args) -> int:
    from corral.server import Server
    overrides = {}
    if args.bind:
        try:
            for text in args.bind:
                Bind.parse(text)
        except ValueError as exc:
            print(f"corral: --bind: {exc}", file=sys.stderr)
            return 2
        overrides[("server", "bind")] = args.bind
    try:
        config = load(args.path, overrides)
    except ConfigError as exc:
        print(f"corral: config error: {exc}", file=sys.stderr)
        return 2
    setup_logging(args.log_level)
    limit = raise_open_file_limit()
    logging.getLogger("corral.error").info("open-file limit: %d", limit)
    return run(Server(config).run())


def cmd_nginx_config(args) -> int:
    from corral.nginx import render
    try:
        config = load(args.path)
        text = render(config, listen=args.listen, server_name=args.server_name,
                      upstreams=args.upstream)
    except ConfigError as exc:
        print(f"corral: config error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"corral: --upstream: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="corral", description="A production application server for Python web apps.")
    parser.add_argument("--version", action="version", version=f"corral {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="serve the app in PATH",
                                description="Serve the app in PATH (its corral.toml, "
                                "or a Django project found there).")
    serve.add_argument("path", nargs="?", default=".", metavar="PATH",
                       help="the app folder (default: the current folder)")
    bind = BY_NAME[("server", "bind")]
    serve.add_argument(bind.cli, metavar="ADDRESS", action="append", help=bind.help)
    serve.add_argument("--log-level", default="INFO",
                       choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                       help="error-log level (default INFO)")
    serve.set_defaults(func=cmd_serve)

    nginx = commands.add_parser(
        "nginx-config", help="print an nginx configuration for the app in PATH",
        description="Print an nginx upstream and server block for the app in PATH: "
        "static mappings served by nginx, the rest passed to corral over FastCGI.")
    nginx.add_argument("path", nargs="?", default=".", metavar="PATH",
                       help="the app folder (default: the current folder)")
    nginx.add_argument("--listen", default="80",
                       help="nginx's listen directive (default 80)")
    nginx.add_argument("--server-name", default="_", help="nginx's server_name (default _)")
    nginx.add_argument("--upstream", action="append", metavar="ADDRESS",
                       help="where nginx sends requests: unix:PATH or HOST:PORT; repeat "
                       "for several (e.g. each standalone worker's socket). Default: the "
                       "app's fastcgi+ bind, else unix:/run/corral/APP.sock")
    nginx.set_defaults(func=cmd_nginx_config)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
