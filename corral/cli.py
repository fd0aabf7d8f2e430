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
            Bind.parse(args.bind)
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
    return run(Server(config).run())


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
    serve.add_argument(bind.cli, metavar="HOST:PORT", help=bind.help)
    serve.add_argument("--log-level", default="INFO",
                       choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                       help="error-log level (default INFO)")
    serve.set_defaults(func=cmd_serve)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
