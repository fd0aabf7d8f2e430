"""The `corral` command: parses arguments and composes the layers; it holds
no logic of its own beyond choosing the event loop and the logging setup.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from corral import __version__
from corral.config import Bind, ConfigError, load, resolve_user
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
    allow_root = getattr(args, "allow_root", False) or os.environ.get(
        "CORRAL_ALLOW_ROOT", "") not in ("", "0")
    try:
        config = load(args.path, overrides)
        config.run_as = resolve_user(config, allow_root)
    except ConfigError as exc:
        print(f"corral: config error: {exc}", file=sys.stderr)
        return 2
    setup_logging(args.log_level)
    log = logging.getLogger("corral.error")
    if config.run_as is not None:
        log.info("workers and the deploy step run as user %s, group %s",
                 config.run_as.user, config.run_as.group)
    elif os.geteuid() == 0:
        log.warning("the workers and the deploy step of %s run as root (allowed by "
                    "--allow-root or CORRAL_ALLOW_ROOT): the app can do anything on "
                    "this machine; set [app] user instead", config.name)
    limit = raise_open_file_limit()
    log.info("open-file limit: %d", limit)
    return run(Server(config, allow_root, overrides).run())


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


def cmd_new(args) -> int:
    from corral.new import create
    if args.bind and not args.serve:
        print("corral new: --bind is for --serve; without it, set [server] bind in the "
              "project's corral.toml", file=sys.stderr)
        return 2
    status = create(args.template, args.name, force=args.force)
    if status != 0 or not args.serve:
        return status
    return cmd_serve(argparse.Namespace(path=args.name, bind=args.bind, log_level="INFO"))


def corral_command() -> list[str]:
    """How a service manager should start this corral: its own script by
    absolute path, else this interpreter with -m corral."""
    script = Path(sys.argv[0])
    if script.name == "corral" and script.is_file():
        return [str(script.absolute())]
    beside = Path(sys.executable).parent / "corral"  # the venv's console script
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    return [sys.executable, "-m", "corral"]


def cmd_systemd(args) -> int:
    import pwd

    from corral.systemd import units
    try:
        config = load(args.path)
        user = args.user
        if not user:
            owner = os.stat(config.root).st_uid
            try:
                user = pwd.getpwuid(owner).pw_name
            except KeyError:  # a uid without a name: systemd takes the number
                user = str(owner)
        files = units(config, user, corral_command(), with_socket=args.socket)
    except ConfigError as exc:
        print(f"corral: config error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"corral: --socket: {exc}. Fix: set [server] bind in the app's corral.toml",
              file=sys.stderr)
        return 2
    if user == "root":
        print("corral: warning: the service would run as root; give --user", file=sys.stderr)
    if not args.write:
        sys.stdout.write("\n".join(files.values()))
        return 0
    folder = Path(args.write)
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
        print(folder / name)
    first = next(iter(files))
    start = next((n for n in files if n.endswith(".socket")), first)
    print(f"next: systemctl daemon-reload && systemctl enable --now {start}", file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    from corral.bench import main
    return main(args)


def cmd_restart(args) -> int:
    from corral.control import RESTART_WAIT, ControlError, ask
    try:
        answer = ask(args.path, "restart", timeout=RESTART_WAIT)
    except ControlError as exc:
        print(f"corral restart: {exc}", file=sys.stderr)
        return 1
    print(f"corral restart: {answer.get('message', answer)}",
          file=sys.stdout if answer.get("ok") else sys.stderr)
    return 0 if answer.get("ok") else 1


def cmd_status(args) -> int:
    import json

    from corral.control import ControlError, ask
    try:
        status = ask(args.path, "status")
    except ControlError as exc:
        print(f"corral status: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    state = status["state"] + (f" ({status['failure']})" if status["failure"] else "")
    print(f"app {status['app']} ({status['root']}): {state}")
    extra = [f"generation {status['starting']} starting"] if status["starting"] else []
    extra += [f"generation {g} finishing its requests" for g in status["retiring"]]
    print(f"generation {status['generation']}" + "".join(f"; {e}" for e in extra))
    count = status.get("processes")
    if count:
        span = (f"{count['min']}-{count['max']}" if count["min"] != count["max"]
                else str(count["max"]))
        preloader = f", preloader pid {count['preloader']}" if count["preloader"] else ""
        print(f"processes: {count['now']} running of {span} ({count['spawn_mode']}"
              f"{preloader})")
    print(f"{'pid':>8} {'gen':>4} {'state':<9} {'requests':>8} {'rss MiB':>8} {'age s':>8}")
    for w in status["workers"]:
        rss = "-" if w["rss_mib"] is None else f"{w['rss_mib']:.1f}"
        note = f"  leaving: {w['leaving']}" if w["leaving"] else ""
        print(f"{w['pid']:>8} {w['generation']:>4} {w['state']:<9} {w['requests']:>8} "
              f"{rss:>8} {w['age']:>8.0f}{note}")
    print(f"queue: {status['queue']} waiting, the oldest for "
          f"{status.get('queue_oldest_wait', 0):.1f} s")
    if status.get("user"):
        print(f"workers run as {status['user']}")
    deploy = status["last_deploy"]
    if deploy:
        print(f"last deploy step: generation {deploy['generation']}, "
              f"{'ok' if deploy['ok'] else 'FAILED'} ({deploy['result']}) at "
              f"{_when(deploy['at'])}, log {deploy['log']}")
    else:
        print("last deploy step: none configured")
    restarts = status["restarts"]
    print(f"recent restarts: {len(restarts) or 'none'}")
    for r in restarts:
        took = f" in {r['seconds']:.1f} s" if r.get("seconds") is not None else ""
        print(f"  {_when(r['at'])} ({r['cause']}): {'ok' if r['ok'] else 'FAILED'}{took}: "
              f"{r['message']}")
    return 0


def _when(stamp: float) -> str:
    import time
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))


def add_app_path(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", nargs="?", default=".", metavar="PATH",
                        help="the app folder (default: the current folder)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="corral", description="A production application server for Python web apps.")
    parser.add_argument("--version", action="version", version=f"corral {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="serve the app in PATH",
                                description="Serve the app in PATH (its corral.toml, "
                                "or a Django project found there).")
    add_app_path(serve)
    bind = BY_NAME[("server", "bind")]
    serve.add_argument(bind.cli, metavar="ADDRESS", action="append", help=bind.help)
    serve.add_argument("--allow-root", action="store_true",
                       help="let the workers and the deploy step run as root when [app] "
                       "user is unset and the app folder is root's, or is root "
                       "(also CORRAL_ALLOW_ROOT=1); without it corral refuses")
    serve.add_argument("--log-level", default="INFO",
                       choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                       help="error-log level (default INFO)")
    serve.set_defaults(func=cmd_serve)

    nginx = commands.add_parser(
        "nginx-config", help="print an nginx configuration for the app in PATH",
        description="Print an nginx upstream and server block for the app in PATH: "
        "static mappings served by nginx, the rest passed to corral over FastCGI.")
    add_app_path(nginx)
    nginx.add_argument("--listen", default="80",
                       help="nginx's listen directive (default 80)")
    nginx.add_argument("--server-name", default="_", help="nginx's server_name (default _)")
    nginx.add_argument("--upstream", action="append", metavar="ADDRESS",
                       help="where nginx sends requests: unix:PATH or HOST:PORT; repeat "
                       "for several (e.g. each standalone worker's socket). Default: the "
                       "app's fastcgi+ bind, else unix:/run/corral/APP.sock")
    nginx.set_defaults(func=cmd_nginx_config)

    from corral.bench import add_arguments as add_bench_arguments
    bench = commands.add_parser(
        "bench", help="measure corral beside the other ways of serving an app",
        description="Serve the sample site's /bench/time and /bench/db pages and a plain "
        "WSGI app with every arrangement installed (corral, nginx, gunicorn, uWSGI, flup, "
        "Granian), load each with wrk, and write a Markdown table and bar charts.")
    add_bench_arguments(bench)
    bench.set_defaults(func=cmd_bench)

    from corral.new import DEFAULT, TEMPLATES
    new = commands.add_parser(
        "new", help="make a new project, ready to serve",
        description="Make the folder NAME with a working project from TEMPLATE, its own "
        "virtual environment (.venv) with the pinned requirements installed, a "
        "corral.toml and a deploy step. Templates: " + "; ".join(
            f"{t.name}: {t.summary}" for t in TEMPLATES.values()) + ". pip's settings "
        "apply (PIP_INDEX_URL, PIP_FIND_LINKS, PIP_NO_INDEX for a local index or wheels).")
    new.add_argument("template", nargs="?", default=DEFAULT, choices=list(TEMPLATES),
                     metavar="TEMPLATE", help=f"one of {', '.join(TEMPLATES)} "
                     f"(default {DEFAULT})")
    new.add_argument("name", metavar="NAME", help="the folder to make; its name names "
                     "the project")
    new.add_argument("--force", action="store_true",
                     help="write into an existing folder that is not empty (files of "
                     "the same name are replaced)")
    new.add_argument("--serve", action="store_true", help="serve the project at once")
    new.add_argument(bind.cli, metavar="ADDRESS", action="append",
                     help="with --serve: where to listen, as for `corral serve --bind`")
    new.set_defaults(func=cmd_new)

    unit = commands.add_parser(
        "systemd", help="print a systemd service unit for the app in PATH",
        description="Print a systemd service unit (Type=notify) that serves the app in "
        "PATH, and with --socket a socket unit from the app's [server] bind, for "
        "socket activation.")
    add_app_path(unit)
    unit.add_argument("--user", help="the user the service runs as (default: the owner "
                      "of the app folder)")
    unit.add_argument("--socket", action="store_true",
                      help="also a .socket unit: systemd listens, and corral serves on "
                      "the sockets it passes")
    unit.add_argument("--write", metavar="FOLDER",
                      help="write the unit files into FOLDER (e.g. /etc/systemd/system) "
                      "instead of printing them")
    unit.set_defaults(func=cmd_systemd)

    restart = commands.add_parser(
        "restart", help="restart the app in PATH with a new generation",
        description="Ask the corral serving PATH (through PATH/tmp/corral.sock) for a "
        "restart: a new generation of workers and its deploy step; the old one serves "
        "until the new one is ready. Exits 1 if the new generation cannot serve (the "
        "old one keeps serving). Same as SIGHUP or touching PATH/tmp/restart.txt.")
    add_app_path(restart)
    restart.set_defaults(func=cmd_restart)

    status = commands.add_parser(
        "status", help="show the state of the app in PATH",
        description="Show the app's state, generation, workers (pid, state, requests "
        "served, memory, age), the last deploy step and recent restarts, from the "
        "corral serving PATH.")
    add_app_path(status)
    status.add_argument("--json", action="store_true", help="print it as JSON")
    status.set_defaults(func=cmd_status)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:
        # `corral status | head`: the reader has gone; not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
