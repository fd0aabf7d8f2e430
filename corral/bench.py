"""`corral bench`: the performance test of the 2011 original, as a command.
The sample site's /bench/time and /bench/db pages and a plain WSGI hello app,
served by every arrangement installed here, loaded by wrk; a Markdown table,
a JSON file and a bar chart per page and database come out.

How one case (a page on a database) is measured:

1. The in-process ceiling: the app called in a loop with a prepared environ,
   no server, in as many processes as the servers get workers.
2. For each arrangement: its processes start in a folder of their own, the
   page is polled until it answers 200, wrk warms it up, then measures it at
   each connection count; the memory of all the arrangement's processes is
   read from /proc just before each measurement ends.
3. Every process is stopped, and its folder removed, whatever happened.

Each MariaDB or PostgreSQL case runs in a database created for it and dropped
after; the site's deploy step runs once per database before any measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import http.client
import importlib.util
import io
import json
import multiprocessing
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import tomllib
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import corral
from corral.nginx import PARAMS

# Where `corral` itself is imported from: on every server's PYTHONPATH, so
# they all find corral.bench_apps even when corral is not installed.
CORRAL_PATH = Path(corral.__file__).resolve().parent.parent
SAMPLE = CORRAL_PATH / "examples" / "django-site"

# page name -> (URL path, bytes every good answer holds)
PAGES = {
    "hello": ("/", b"Hello, world!"),
    "time": ("/bench/time", b"The time is"),
    "db": ("/bench/db", b"The time is"),
}
DATABASES = {"sqlite": "SQLite", "mariadb": "MariaDB", "postgresql": "PostgreSQL"}
# How the development and CI machines run them: root with an empty password,
# PostgreSQL with trust authentication.
DB_SERVERS = {"mariadb": ("127.0.0.1", 3306), "postgresql": ("127.0.0.1", 5432)}

WRK_TIMEOUT = 5  # seconds; an answer later than this counts as an error
READY_TIMEOUT = 90.0  # seconds an arrangement may take to answer its first 200
STOP_GRACE = 15.0  # seconds a server may take to stop before it is killed
PR_SET_PDEATHSIG = 1


class BenchError(Exception):
    """One arrangement or database could not be measured; str() says why."""


# -- processes ----------------------------------------------------------------

def free_port() -> int:
    """A TCP port free at this moment.  Bind-then-close can race with another
    program taking the port before the server binds it; that is acceptable in
    a benchmark run by hand, and a lost race shows as a server that fails to
    start, never as a wrong figure."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_program(name: str) -> str | None:
    """`name` from this interpreter's environment first (where pip put it),
    then PATH, then the sbin folders where Debian keeps nginx."""
    here = Path(sys.executable).parent / name
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    return shutil.which(name) or shutil.which(name, path="/usr/local/sbin:/usr/sbin:/sbin")


def _die_with_us() -> None:
    # Run in each server between fork and exec: the kernel sends it SIGTERM
    # if the bench dies, even by SIGKILL, so no server outlives a lost run.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _process_table() -> dict[int, int]:
    """pid -> parent pid of every live, non-zombie process, from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            table[int(entry)] = int(fields[1])
    return table


def descendants(roots: list[int]) -> list[int]:
    """`roots` and all their live descendants."""
    table = _process_table()
    found = [pid for pid in roots if pid in table]
    children: dict[int, list[int]] = {}
    for pid, parent in table.items():
        children.setdefault(parent, []).append(pid)
    for pid in found:  # grows while we walk it: breadth first
        found += [child for child in children.get(pid, ()) if child not in found]
    return found


def rss_kib(pids: list[int]) -> int:
    """The summed resident memory of `pids`.  Pages shared between a master
    and its forked workers count once per process, as `ps` shows them."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                match = re.search(r"^VmRSS:\s+(\d+)", f.read(), re.M)
        except OSError:
            continue
        total += int(match.group(1)) if match else 0
    return total


class Launch:
    """The processes of one arrangement, in a folder that holds their logs,
    sockets and config.  Each starts in a session of its own, so that a
    Ctrl-C at the terminal reaches the bench alone and the bench decides how
    each server stops."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.stop_signals: dict[int, int] = {}

    def spawn(self, name: str, argv: list[str], env: dict[str, str],
              cwd: Path | None = None, stop: int = signal.SIGTERM) -> None:
        """Start `argv`; `stop` is the signal that asks it to stop."""
        with open(self.folder / f"{name}.log", "wb") as log:
            proc = subprocess.Popen([str(a) for a in argv], cwd=cwd, env=env,
                                    stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    preexec_fn=_die_with_us)
        self.procs.append((name, proc))
        self.stop_signals[proc.pid] = stop

    def tail(self, name: str, lines: int = 12) -> str:
        try:
            text = (self.folder / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join("    " + line for line in text.splitlines()[-lines:])

    def check(self) -> None:
        """BenchError if any process has exited, with the end of its log."""
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise BenchError(f"{name} exited with status {proc.returncode}:\n"
                                 + self.tail(name))

    def pids(self) -> list[int]:
        return descendants([proc.pid for _, proc in self.procs])

    def stop(self) -> None:
        """Ask each main process to stop (servers stop their own workers),
        kill what is left after the grace period, by process group and then
        by pid for any descendant that left the group."""
        everyone = self.pids()
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(self.stop_signals[proc.pid])
        deadline = time.monotonic() + STOP_GRACE
        for _, proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.0, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        alive = set(_process_table())
        for pid in everyone:
            if pid in alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_ready(launch: Launch, port: int, path: str, marker: bytes) -> None:
    """Poll the page until it answers 200 with `marker` in its body, for at
    most READY_TIMEOUT seconds, failing early if a process exits."""
    deadline = time.monotonic() + READY_TIMEOUT
    last = "no answer"
    while True:
        launch.check()
        try:
            status, body = http_get(port, path)
            if status == 200 and marker in body:
                return
            last = f"status {status}, body {body[:200]!r}"
        except (OSError, http.client.HTTPException) as exc:
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() > deadline:
            logs = "\n".join(launch.tail(name) for name, _ in launch.procs)
            raise BenchError(f"http://127.0.0.1:{port}{path} not ready after "
                             f"{READY_TIMEOUT:g} s ({last}); logs:\n{logs}")
        time.sleep(0.1)


def wait_unix_sockets(launch: Launch, paths: list[Path]) -> None:
    """Poll until something accepts on each socket: nginx counts a refused
    upstream as failed for ten seconds, which would skew the measurement."""
    deadline = time.monotonic() + READY_TIMEOUT
    for path in paths:
        while True:
            launch.check()
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(str(path))
                    break
                except OSError:
                    pass
            if time.monotonic() > deadline:
                raise BenchError(f"nothing accepts on {path} after {READY_TIMEOUT:g} s")
            time.sleep(0.05)


# -- what the servers run -------------------------------------------------------

@dataclass
class Target:
    """One app as every arrangement runs it."""

    spec: str  # the WSGI callable, module:callable
    folder: Path  # the servers' working folder; holds the app's corral.toml
    env: dict[str, str]  # the whole environment of every server process


@dataclass(frozen=True)
class Case:
    """A page on a database (None for the hello app, which has none)."""

    page: str
    database: str | None

    @property
    def slug(self) -> str:
        return self.page if self.database is None else f"{self.page}-{self.database}"

    @property
    def title(self) -> str:
        if self.database is None:
            return "hello (a plain WSGI app)"
        return f"{PAGES[self.page][0]} on {DATABASES[self.database]}"


def base_env(paths: list[Path]) -> dict[str, str]:
    """Our environment with `paths` first on PYTHONPATH, less the variables
    that would change what the sample site does behind the bench's back."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("SAMPLE_")
           and key not in ("DJANGO_SETTINGS_MODULE", "DEPLOY_FILE", "DEPLOY_LOG")}
    inherited = [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []
    env["PYTHONPATH"] = os.pathsep.join([*map(str, paths), *inherited])
    # The bench's copies of the apps belong to whoever runs it, root too:
    # corral serve would refuse to run their workers as root otherwise.
    env["CORRAL_ALLOW_ROOT"] = "1"
    return env


def corral_toml(spec: str, processes: int, extra: str = "") -> str:
    # No [deploy]: the bench runs the deploy step once per database itself,
    # rather than once per start of corral.  No access log, as for every
    # other server here.
    return (f"# corral bench: how corral runs this app.\n[app]\nwsgi = \"{spec}\"\n"
            f"processes = {processes}\n[env]\nPYTHONPATH = \".\"\n{extra}"
            "[server]\naccess_log = \"\"\n")


def prepare_hello(folder: Path, processes: int) -> Target:
    folder.mkdir()
    spec = "corral.bench_apps.hello:application"
    (folder / "corral.toml").write_text(corral_toml(spec, processes))
    return Target(spec, folder, base_env([folder, CORRAL_PATH]))


def prepare_site(source: Path, folder: Path, processes: int) -> Target:
    """A copy of the sample site without its generated files, so the bench
    never touches the user's copy or its database."""
    generated = shutil.ignore_patterns("__pycache__", "*.pyc", "db.sqlite3", "*.log")

    def ignore(where: str, names: list[str]) -> set[str]:
        # Nor its run folder: a `corral serve` of the site may be running,
        # and its sockets there cannot be copied.
        skipped = generated(where, names)
        if Path(where) == Path(source):
            skipped |= {"tmp"} & set(names)
        return skipped

    shutil.copytree(source, folder, ignore=ignore)
    static = folder / "static"
    for item in static.iterdir() if static.is_dir() else ():
        if item.name != ".gitignore":
            shutil.rmtree(item) if item.is_dir() else item.unlink()
    static.mkdir(exist_ok=True)
    spec = "mysite.wsgi:application"
    # The site's own static mappings, so nginx-config serves them as it would.
    with open(source / "corral.toml", "rb") as f:
        static_map = tomllib.load(f).get("static", {})
    mappings = "".join(f"{json.dumps(k)} = {json.dumps(v)}\n" for k, v in static_map.items())
    (folder / "corral.toml").write_text(corral_toml(
        spec, processes, 'DJANGO_SETTINGS_MODULE = "mysite.settings"\n'
        + (f"[static]\n{mappings}" if mappings else "")))
    env = base_env([folder, CORRAL_PATH])
    env["DJANGO_SETTINGS_MODULE"] = "mysite.settings"
    return Target(spec, folder, env)


def _db_connect(kind: str):
    host, port = DB_SERVERS[kind]
    if kind == "mariadb":
        import pymysql
        return pymysql.connect(host=host, port=port, user="root", password="",
                               autocommit=True, connect_timeout=5)
    import psycopg
    return psycopg.connect(host=host, port=port, user="root", dbname="postgres",
                           autocommit=True, connect_timeout=5)


def _db_execute(kind: str, *statements: str) -> str:
    """Run `statements` on the server; the first column of the last result."""
    conn = _db_connect(kind)
    try:
        cursor = conn.cursor()
        for statement in statements:
            cursor.execute(statement)
        row = cursor.fetchone() if cursor.description else None
        return str(row[0]) if row else ""
    finally:
        conn.close()


def open_database(kind: str, site: Target, stack: contextlib.ExitStack,
                  durable: bool) -> tuple[dict, str]:
    """A fresh database of `kind` for the site: the env vars that point the
    site at it, and how the header describes it.  Its drop, and the undoing
    of any setting changed for it, are put on `stack`.

    Unless `durable`, a commit is not flushed to disk before it returns.
    This machine's disk does a few hundred flushes a second, which would
    make /bench/db measure the disk, the same for every arrangement, rather
    than the servers.  The SQLite file is on tmpfs (the caller puts the
    site there); PostgreSQL gets synchronous_commit off for the bench's
    database alone; MariaDB's log flush is global, so it is set to once a
    second for the run and put back after."""
    if kind == "sqlite":
        (site.folder / "db.sqlite3").unlink(missing_ok=True)  # the site's file, in our copy
        where = "" if durable else " (file on tmpfs)"
        return {"SAMPLE_DB": "sqlite"}, f"SQLite {sqlite3.sqlite_version}{where}"
    host, port = DB_SERVERS[kind]
    label = DATABASES[kind]
    try:
        # A plain connect first tells "not running" apart from driver errors.
        socket.create_connection((host, port), timeout=3).close()
    except OSError as exc:
        raise BenchError(f"{label} at {host}:{port} is unreachable ({exc})") from None
    name = f"corral_bench_{secrets.token_hex(4)}"
    create = (f"CREATE DATABASE {name} CHARACTER SET utf8mb4" if kind == "mariadb"
              else f"CREATE DATABASE {name}")
    version_query = "SELECT VERSION()" if kind == "mariadb" else "SHOW server_version"
    try:
        version = _db_execute(kind, create, version_query)
    except Exception as exc:  # a missing driver or a refusal: this database is left out
        raise BenchError(f"{label} at {host}:{port}: cannot create a database "
                         f"({type(exc).__name__}: {exc})") from None
    stack.callback(drop_database, kind, name)
    described = f"{label} {version}"
    if not durable:
        described += " " + _relax_commits(kind, name, stack)
    env = {"SAMPLE_DB": kind, "SAMPLE_DB_NAME": name, "SAMPLE_DB_HOST": host,
           "SAMPLE_DB_PORT": str(port), "SAMPLE_DB_USER": "root", "SAMPLE_DB_PASSWORD": ""}
    return env, described


def _relax_commits(kind: str, name: str, stack: contextlib.ExitStack) -> str:
    """Commits that return before the disk flush (see open_database); what
    was done, as the header says it."""
    try:
        if kind == "postgresql":
            _db_execute(kind, f"ALTER DATABASE {name} SET synchronous_commit = off")
            return "(synchronous_commit off for the bench database)"
        variable = "innodb_flush_log_at_trx_commit"
        before = _db_execute(kind, f"SELECT @@GLOBAL.{variable}")
        if before != "1":
            return f"({variable} = {before}, as configured)"
        _db_execute(kind, f"SET GLOBAL {variable} = 2")
        stack.callback(_db_quietly, kind, f"SET GLOBAL {variable} = {before}")
        return f"({variable} = 2 during the run, then {before} again)"
    except Exception as exc:  # no privilege: measured as configured, and said so
        return f"(durable commits: {type(exc).__name__}: {exc})"


def drop_database(kind: str, name: str) -> None:
    # FORCE: a connection a killed worker left behind must not keep it.
    _db_quietly(kind, f"DROP DATABASE IF EXISTS {name}" if kind == "mariadb"
                else f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _db_quietly(kind: str, statement: str) -> None:
    """A clean-up statement: a failure is said, and the clean-up goes on."""
    try:
        _db_execute(kind, statement)
    except Exception as exc:
        say(f"{DATABASES[kind]}: {statement!r} failed: {exc}")


def run_deploy(site: Target, log: Path) -> None:
    """The site's own deploy step (migrate, collectstatic, seed), once."""
    with open(log, "wb") as out:
        result = subprocess.run([sys.executable, "deploy.py"], cwd=site.folder, env=site.env,
                                stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, timeout=600)
    if result.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise BenchError(f"deploy step failed with status {result.returncode}:\n"
                         + "\n".join("    " + line for line in tail))


# -- the arrangements -------------------------------------------------------------

NGINX_MAIN = """\
# nginx for one arrangement of `corral bench`, in a folder of its own.
daemon off;
{user}
# One nginx process, like corral's front and uWSGI's HTTP router: the app's
# worker processes are what every arrangement has the same number of.
worker_processes 1;
worker_rlimit_nofile 8192;
pid {folder}/nginx.pid;
error_log {folder}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;  # no server in the bench writes an access log
    # A kept client connection serves as many requests as the client sends,
    # as in the other fronts (nginx's default closes it every 1000).
    keepalive_requests 1000000;
    client_body_temp_path {folder}/body;
    fastcgi_temp_path {folder}/fastcgi;
    proxy_temp_path {folder}/proxy;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
    include {folder}/site.conf;
}}
"""


def start_nginx(launch: Launch, site_conf: str) -> None:
    folder = launch.folder / "nginx"
    folder.mkdir()
    (folder / "site.conf").write_text(site_conf)
    user = "user root;" if os.geteuid() == 0 else ""  # else workers run as nobody
    (folder / "nginx.conf").write_text(NGINX_MAIN.format(folder=folder, user=user))
    # -e: the error log from the first moment, before the config is read.
    launch.spawn("nginx", [find_program("nginx"), "-c", folder / "nginx.conf",
                           "-p", folder, "-e", folder / "error.log"], dict(os.environ))


def nginx_site(port: int, pass_line: str, param: str) -> str:
    """A server block for uWSGI or flup: the params corral's own nginx config
    sends, plus SCRIPT_NAME and PATH_INFO, which these servers take as given."""
    params = [*PARAMS, ("SCRIPT_NAME", '""'), ("PATH_INFO", "$document_uri")]
    lines = [f"        {param} {name} {value};" for name, value in params]
    return (f"server {{\n    listen 127.0.0.1:{port};\n    location / {{\n"
            f"        {pass_line};\n" + "\n".join(lines) + "\n    }\n}\n")


def corral_nginx_site(target: Target, port: int, upstreams: list[Path]) -> str:
    """What `corral nginx-config` prints for the app: the bench measures the
    configuration corral gives its users."""
    argv = [sys.executable, "-m", "corral", "nginx-config", str(target.folder),
            "--listen", f"127.0.0.1:{port}"]
    for path in upstreams:
        argv += ["--upstream", f"unix:{path}"]
    result = subprocess.run(argv, env=target.env, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise BenchError(f"corral nginx-config failed: {result.stderr.strip()}")
    return result.stdout


def uwsgi_options(target: Target) -> list[str]:
    options = ["--master", "--die-on-term",  # SIGTERM stops it (by default it reloads)
               "--need-app",  # an app that cannot load stops it, instead of 500s
               "--disable-logging", "--chdir", str(target.folder), "--module", target.spec]
    # uWSGI's default backlog (100) is below the 256 connections of the last
    # point; the other servers listen with 1024 or more.  Never past the
    # kernel's cap, which uWSGI refuses.
    try:
        somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    except (OSError, ValueError):
        somaxconn = 128
    options += ["--listen", str(min(1024, somaxconn))]
    if sys.prefix != sys.base_prefix:
        options += ["--home", sys.prefix]  # this virtual environment's packages
    for path in target.env["PYTHONPATH"].split(os.pathsep):
        options += ["--pythonpath", path]
    return options


class Arrangement:
    """A way of serving the app: what it needs, and how it starts."""

    key = ""
    label = ""
    programs: tuple[str, ...] = ()  # executables it needs
    modules: tuple[str, ...] = ()  # Python packages it needs

    def missing(self) -> str | None:
        """What this machine lacks for it, or None."""
        for name in self.programs:
            if not find_program(name):
                return f"{name} is not installed"
        for name in self.modules:
            if importlib.util.find_spec(name) is None:
                return f"{name} is not installed (pip install -e '.[bench]')"
        return None

    def start(self, launch: Launch, target: Target, port: int, processes: int) -> None:
        raise NotImplementedError


class CorralFront(Arrangement):
    key, label = "corral", "corral's own HTTP front"

    def start(self, launch, target, port, processes):
        launch.spawn("corral", [sys.executable, "-m", "corral", "serve", target.folder,
                                "--bind", f"127.0.0.1:{port}", "--log-level", "WARNING"],
                     target.env)


class NginxCorralListener(Arrangement):
    key, label = "nginx-corral", "nginx -> corral's FastCGI listener"
    programs = ("nginx",)

    def start(self, launch, target, port, processes):
        sock = launch.folder / "corral.sock"
        launch.spawn("corral", [sys.executable, "-m", "corral", "serve", target.folder,
                                "--bind", f"fastcgi+unix:{sock}", "--log-level", "WARNING"],
                     target.env)
        wait_unix_sockets(launch, [sock])
        start_nginx(launch, corral_nginx_site(target, port, [sock]))


class NginxCorralWorkers(Arrangement):
    key, label = "nginx-corral-workers", "nginx -> standalone corral workers"
    programs = ("nginx",)

    def start(self, launch, target, port, processes):
        socks = [launch.folder / f"worker{i}.sock" for i in range(processes)]
        for i, sock in enumerate(socks):
            launch.spawn(f"worker{i}", [sys.executable, "-m", "corral.worker", target.spec,
                                        "--bind", f"unix:{sock}"],
                         target.env, cwd=target.folder)
        wait_unix_sockets(launch, socks)
        start_nginx(launch, corral_nginx_site(target, port, socks))


class Gunicorn(Arrangement):
    key, label = "gunicorn", "gunicorn, sync workers"
    modules = ("gunicorn",)

    def start(self, launch, target, port, processes):
        launch.spawn("gunicorn", [sys.executable, "-m", "gunicorn", "--workers", processes,
                                  "--worker-class", "sync", "--bind", f"127.0.0.1:{port}",
                                  "--chdir", target.folder, "--log-level", "warning",
                                  target.spec], target.env)


class UwsgiHttp(Arrangement):
    key, label = "uwsgi", "uWSGI with its HTTP router (--http)"
    programs = ("uwsgi",)

    def start(self, launch, target, port, processes):
        launch.spawn("uwsgi", [find_program("uwsgi"), "--processes", processes,
                               "--http", f"127.0.0.1:{port}",
                               "--http-keepalive",  # kept client connections, as the others
                               *uwsgi_options(target)], target.env)


class NginxUwsgi(Arrangement):
    key, label = "nginx-uwsgi", "nginx -> uWSGI (uwsgi_pass)"
    programs = ("nginx", "uwsgi")

    def start(self, launch, target, port, processes):
        sock = launch.folder / "uwsgi.sock"
        launch.spawn("uwsgi", [find_program("uwsgi"), "--processes", processes,
                               "--socket", sock, *uwsgi_options(target)], target.env)
        wait_unix_sockets(launch, [sock])
        start_nginx(launch, nginx_site(port, f"uwsgi_pass unix:{sock}", "uwsgi_param"))


class NginxFlup(Arrangement):
    key, label = "nginx-flup", "nginx -> flup, prefork FastCGI"
    programs = ("nginx",)
    modules = ("flup",)

    def start(self, launch, target, port, processes):
        sock = launch.folder / "flup.sock"
        launch.spawn("flup", [sys.executable, "-m", "corral.bench_apps.flup_fcgi", target.spec,
                              "--socket", sock, "--processes", processes],
                     # flup's master never sees its stop flag: the select() it
                     # waits in restarts after the signal handler (PEP 475).
                     # The group is killed, the children with it.
                     target.env, cwd=target.folder, stop=signal.SIGKILL)
        wait_unix_sockets(launch, [sock])
        # No fastcgi_keep_conn: a flup child serves one connection until it
        # closes, so kept connections would leave the others waiting in its
        # backlog.  nginx opens one per request, as the original's setup did.
        start_nginx(launch, nginx_site(port, f"fastcgi_pass unix:{sock}", "fastcgi_param"))


class Granian(Arrangement):
    key, label = "granian", "Granian, WSGI interface"
    modules = ("granian",)

    def start(self, launch, target, port, processes):
        launch.spawn("granian", [sys.executable, "-m", "granian", "--interface", "wsgi",
                                 "--host", "127.0.0.1", "--port", port,
                                 "--workers", processes, "--working-dir", target.folder,
                                 "--log-level", "warning", target.spec], target.env)


ARRANGEMENTS = [CorralFront(), NginxCorralListener(), NginxCorralWorkers(), Gunicorn(),
                UwsgiHttp(), NginxUwsgi(), NginxFlup(), Granian()]
BY_KEY = {a.key: a for a in ARRANGEMENTS}
# --quick: corral and its nginx setup beside the servers most sites run.
QUICK = ("corral", "nginx-corral", "gunicorn", "uwsgi", "granian")


# -- the in-process ceiling ----------------------------------------------------------

def base_environ(path: str) -> dict:
    """What a server would hand the app for `GET path` from wrk."""
    return {
        "REQUEST_METHOD": "GET", "SCRIPT_NAME": "", "PATH_INFO": path, "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8000", "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1", "REMOTE_PORT": "40000", "HTTP_HOST": "127.0.0.1:8000",
        "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.multithread": False,
        "wsgi.multiprocess": True, "wsgi.run_once": False,
    }


def call_app(app, base: dict) -> bool:
    """One request through `app`, its body read and closed; True on a 200."""
    environ = dict(base)  # apps may change it, as each server builds a new one
    environ["wsgi.input"] = io.BytesIO(b"")
    environ["wsgi.errors"] = sys.stderr
    status = []

    def start_response(line, headers, exc_info=None):
        status.append(line)
        return lambda data: None

    result = app(environ, start_response)
    try:
        for _ in result:
            pass
    finally:
        close = getattr(result, "close", None)
        if close:
            close()
    return bool(status) and status[0].startswith("200")


def _ceiling_process(target: Target, path: str, seconds: float, barrier, queue) -> None:
    """One process of the ceiling: import the app as a worker would, warm it
    up, then call it for `seconds` once every process is ready."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the bench stops us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the bench's handler, forked with us
    try:
        os.environ.clear()
        os.environ.update(target.env)
        os.chdir(target.folder)
        sys.path[:0] = target.env["PYTHONPATH"].split(os.pathsep)
        module, _, attr = target.spec.partition(":")
        app = importlib.import_module(module)
        for part in attr.split("."):
            app = getattr(app, part)
        base = base_environ(path)
        warm_until = time.monotonic() + 0.5
        while time.monotonic() < warm_until:
            call_app(app, base)
        barrier.wait(60)
        count = failed = 0
        started = time.perf_counter()
        deadline = started + seconds
        while time.perf_counter() < deadline:
            for _ in range(10):  # look at the clock less often than we call
                count += 1
                failed += not call_app(app, base)
        queue.put((count, failed, time.perf_counter() - started))
    except BaseException:
        queue.put(traceback.format_exc())


def measure_ceiling(target: Target, path: str, processes: int, seconds: float) -> float:
    """Requests per second of `processes` processes calling the app in a loop."""
    # fork, not spawn: spawn would import `python -m corral`'s __main__ again.
    # The bench has no threads here, so forking it is safe.
    context = multiprocessing.get_context("fork")
    queue, barrier = context.Queue(), context.Barrier(processes)
    procs = [context.Process(target=_ceiling_process,
                             args=(target, path, seconds, barrier, queue))
             for _ in range(processes)]
    try:
        for proc in procs:
            proc.start()
        answers = [queue.get(timeout=seconds + 120) for _ in procs]
    finally:
        for proc in procs:
            proc.join(5)  # it ends by itself once its answer is sent
            if proc.is_alive():
                proc.terminate()
                proc.join(10)
    for answer in answers:
        if isinstance(answer, str):
            raise BenchError("the in-process ceiling failed:\n" + answer)
        if answer[1]:
            raise BenchError(f"the in-process ceiling: {answer[1]} of {answer[0]} calls "
                             "did not answer 200")
    return sum(count / elapsed for count, _, elapsed in answers)


# -- load --------------------------------------------------------------------------

@dataclass
class Point:
    """One measurement: an arrangement at a number of connections."""

    case: str
    arrangement: str
    connections: int
    rps: float  # good (2xx/3xx) answers per second
    p50_ms: float
    p99_ms: float
    requests: int  # every answer, good or not
    errors: int  # socket errors (connect, read, write, timeout) and non-2xx/3xx answers
    memory_mib: float


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def parse_wrk(text: str) -> dict:
    """The figures of one `wrk --latency` report."""
    def number(pattern: str) -> float:
        match = re.search(pattern, text, re.M)
        return float(match.group(1)) if match else 0.0

    latency = {}
    for share, value, unit in re.findall(r"^\s*(50|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m)\s*$",
                                         text, re.M):
        latency[share] = float(value) * _UNITS_MS[unit]
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), "
                        r"timeout (\d+)", text)
    failed = int(number(r"Non-2xx or 3xx responses:\s+(\d+)"))
    requests = int(number(r"^\s*(\d+) requests in"))
    # wrk's rate counts every answer; a server that fails fast (a 502 from
    # nginx, say) must not look fast, so only the good answers are counted.
    good = (requests - failed) / requests if requests else 0.0
    return {"rps": number(r"^Requests/sec:\s+([\d.]+)") * good, "requests": requests,
            "p50_ms": latency.get("50", 0.0), "p99_ms": latency.get("99", 0.0),
            "errors": failed + (sum(map(int, sockets.groups())) if sockets else 0)}


def run_wrk(wrk: str, port: int, path: str, connections: int, seconds: int, threads: int,
            launch: Launch | None = None) -> tuple[dict, int]:
    """wrk's figures, and the memory (KiB) of `launch`'s processes read as
    late in the run as the half-second sampling allows."""
    argv = [wrk, f"-t{min(threads, connections)}", f"-c{connections}", f"-d{seconds}s",
            f"--timeout={WRK_TIMEOUT}s", "--latency", f"http://127.0.0.1:{port}{path}"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    memory = 0
    try:
        while True:
            try:
                out, err = proc.communicate(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if launch:
                    memory = rss_kib(launch.pids())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise BenchError(f"wrk failed ({proc.returncode}): {(err or out).strip()}")
    if launch and not memory:
        memory = rss_kib(launch.pids())
    return parse_wrk(out), memory


# -- the run -------------------------------------------------------------------------

@dataclass
class Plan:
    """What one `corral bench` run measures, from its arguments."""

    pages: list[str]
    databases: list[str]
    arrangements: list[Arrangement]
    connections: list[int]
    duration: int
    warmup: int
    processes: int
    threads: int
    site: Path
    out: Path
    durable: bool
    command: str

    @property
    def ceiling_seconds(self) -> float:
        return self.duration

    def cases(self) -> list[Case]:
        """Every case, in the order measured.  /bench/time never queries the
        database (its middleware touches neither session nor user), so it is
        measured once, on the first database."""
        cases = [Case("hello", None)] if "hello" in self.pages else []
        for i, database in enumerate(self.databases):
            cases += [Case(page, database) for page in ("time", "db")
                      if page in self.pages and (page == "db" or i == 0)]
        return cases

    def estimate_seconds(self) -> float:
        starts = len(self.cases()) * len(self.arrangements)
        # Measured on the 2-core development machine: a start, the
        # readiness poll and a stop take about a second together.
        per_start = 1 + self.warmup + len(self.connections) * (self.duration + 0.1)
        return starts * per_start + len(self.cases()) * (self.ceiling_seconds + 3) + 15


@dataclass
class Results:
    header: dict
    cases: list[Case] = field(default_factory=list)
    ceilings: dict[str, float] = field(default_factory=dict)
    points: list[Point] = field(default_factory=list)
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # case, who, why
    notes: list[str] = field(default_factory=list)

    def point(self, case: str, arrangement: str, connections: int) -> Point | None:
        for p in self.points:
            if (p.case, p.arrangement, p.connections) == (case, arrangement, connections):
                return p
        return None


def say(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


def _summary(exc: Exception) -> str:
    """An error's first line, and its last where they differ (a traceback's
    exception, a log's final line), for one line of the table's notes."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or ["?"]
    return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"


class Runner:
    """Measures every case of a plan into `results`, one line per point on
    stderr; every process and database it makes is gone when it returns."""

    def __init__(self, plan: Plan, wrk: str, results: Results, tmp: Path) -> None:
        self.plan, self.wrk, self.results, self.tmp = plan, wrk, results, tmp
        self.total = len(plan.cases()) * len(plan.arrangements) * len(plan.connections)
        self.done = 0

    def run(self) -> None:
        plan = self.plan
        cases = plan.cases()
        if any(case.page == "hello" for case in cases):
            hello = prepare_hello(self.tmp / "hello", plan.processes)
            self.measure_case(Case("hello", None), hello)
        databases = [db for db in plan.databases if any(c.database == db for c in cases)]
        if not databases:
            return
        site = prepare_site(plan.site, self.tmp / "site", plan.processes)
        time_done = "time" not in plan.pages
        for kind in databases:
            with contextlib.ExitStack() as stack:
                try:
                    env, version = open_database(kind, site, stack, plan.durable)
                    target = Target(site.spec, site.folder, {**site.env, **env})
                    say(f"{DATABASES[kind]}: deploy step (migrate, collectstatic, seed)")
                    run_deploy(target, self.tmp / f"deploy-{kind}.log")
                except BenchError as exc:
                    say(f"{DATABASES[kind]} left out: {exc}")
                    self.results.notes.append(f"{DATABASES[kind]} left out: {exc}")
                    # Its db case is lost; the time case moves to the next
                    # database, unless there is none.
                    lost = ("db" in plan.pages) + (not time_done and kind == databases[-1])
                    self.total -= lost * len(plan.arrangements) * len(plan.connections)
                    continue
                self.results.header["databases"][kind] = version
                if not time_done:
                    self.measure_case(Case("time", kind), target)
                    time_done = True
                if "db" in plan.pages:
                    self.measure_case(Case("db", kind), target)

    def measure_case(self, case: Case, target: Target) -> None:
        plan, path = self.plan, PAGES[case.page][0]
        self.results.cases.append(case)
        try:
            ceiling = measure_ceiling(target, path, plan.processes, plan.ceiling_seconds)
            self.results.ceilings[case.slug] = ceiling
            say(f"{case.slug}: in-process ceiling {ceiling:,.0f} req/s "
                f"({plan.processes} processes)")
        except BenchError as exc:
            say(f"{case.slug}: {exc}")
            self.results.failures.append((case.slug, "in-process ceiling", _summary(exc)))
        for arrangement in plan.arrangements:
            self.measure_arrangement(case, target, arrangement)

    def measure_arrangement(self, case: Case, target: Target, arrangement: Arrangement) -> None:
        plan, (path, marker) = self.plan, PAGES[case.page]
        folder = self.tmp / f"{case.slug}-{arrangement.key}"
        folder.mkdir()
        launch = Launch(folder)
        try:
            port = free_port()
            arrangement.start(launch, target, port, plan.processes)
            wait_ready(launch, port, path, marker)
            # The warm-up also lets every worker import the app: a server
            # may answer the readiness poll before all its workers are up.
            run_wrk(self.wrk, port, path, min(32, max(plan.connections)), plan.warmup,
                    plan.threads)
            for connections in plan.connections:
                figures, memory = run_wrk(self.wrk, port, path, connections, plan.duration,
                                          plan.threads, launch)
                launch.check()
                point = Point(case.slug, arrangement.key, connections,
                              memory_mib=memory / 1024, **figures)
                self.results.points.append(point)
                self.done += 1
                say(f"[{self.done}/{self.total}] {case.slug} {arrangement.key} "
                    f"c={connections}: {point.rps:,.0f} req/s, p50 {point.p50_ms:.2f} ms, "
                    f"p99 {point.p99_ms:.2f} ms, {point.errors} errors, "
                    f"{point.memory_mib:.0f} MiB")
        except BenchError as exc:
            say(f"{case.slug} {arrangement.key}: not measured: {exc}")
            self.results.failures.append((case.slug, arrangement.key, _summary(exc)))
            self.total -= len(plan.connections) - sum(
                p.case == case.slug and p.arrangement == arrangement.key
                for p in self.results.points)
        finally:
            launch.stop()
            shutil.rmtree(folder, ignore_errors=True)


# -- what the results say ------------------------------------------------------------

def _command_version(argv: list[str], pattern: str) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except OSError:
        return "?"
    match = re.search(pattern, result.stdout + result.stderr)
    return match.group(1) if match else "?"


def _package_version(name: str) -> str:
    from importlib import metadata
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def describe_machine(wrk: str, arrangements: list[Arrangement]) -> dict:
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        match = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        cpu = match.group(1).strip() if match else cpu
    memory = "?"
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        match = re.search(r"^MemTotal:\s+(\d+)", f.read(), re.M)
        memory = f"{int(match.group(1)) / 1024 / 1024:.0f} GiB" if match else memory
    versions = {"corral": corral.__version__, "uvloop": _package_version("uvloop"),
                "Django": _package_version("Django"),
                "wrk": _command_version([wrk, "-v"], r"wrk (\S+)")}
    keys = {a.key for a in arrangements}
    if any("nginx" in a.programs for a in arrangements):
        versions["nginx"] = _command_version([find_program("nginx"), "-v"], r"nginx/(\S+)")
    if "gunicorn" in keys:
        versions["gunicorn"] = _package_version("gunicorn")
    if keys & {"uwsgi", "nginx-uwsgi"}:
        versions["uWSGI"] = _command_version([find_program("uwsgi"), "--version"], r"(\S+)")
    if "nginx-flup" in keys:
        versions["flup"] = _package_version("flup")
    if "granian" in keys:
        versions["Granian"] = _package_version("granian")
    return {"date": time.strftime("%Y-%m-%d %H:%M %Z"),
            "nproc": len(os.sched_getaffinity(0)), "cpu": cpu, "memory": memory,
            "kernel": f"Linux {platform.release()}", "python": platform.python_version(),
            "versions": versions, "databases": {}}


def _ms(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def _share(value: float) -> str:
    return f"{value:.0%}" if value >= 0.1 else f"{value:.2%}"


def render_markdown(results: Results, plan: Plan, charts: set[str]) -> str:
    h = results.header
    versions = ", ".join(f"{name} {version}" for name, version in h["versions"].items())
    lines = [
        "# corral bench results", "",
        f"- when: {h['date']}; command: `{plan.command}`",
        f"- machine: {h['nproc']} CPUs (nproc), {h['cpu']}, {h['memory']}, {h['kernel']}",
        f"- Python {h['python']}; {versions}",
    ]
    if h["databases"]:
        lines.append("- databases: " + ", ".join(h["databases"].values()))
    lines += [
        f"- {plan.processes} worker processes in every arrangement; wrk with "
        f"{plan.threads} thread{'s' if plan.threads > 1 else ''}, {plan.duration} s per "
        f"point after a {plan.warmup} s "
        f"warm-up; answers later than {WRK_TIMEOUT} s count as errors",
        "- *requests/s*: good (2xx or 3xx) answers only; *errors*: other answers and "
        "wrk's socket errors (connect, read, write, timeout)",
        "- *of ceiling*: requests/s as a share of the same page called in-process "
        "(no server); *vs corral*: as a ratio to corral's own front at the same "
        "connections; *memory*: the summed RSS of all the arrangement's processes "
        "at the end of the point", "",
        "| arrangement | what it is |", "|---|---|",
        *[f"| {a.key} | {a.label} |" for a in plan.arrangements], "",
    ]
    for case in results.cases:
        lines += [f"## {case.title}", ""]
        ceiling = results.ceilings.get(case.slug)
        if ceiling:
            lines += [f"In-process ceiling: **{ceiling:,.0f}** requests/s "
                      f"({plan.processes} processes).", ""]
        if case.slug in charts:
            lines += [f"![{case.title}]({case.slug}.png)", ""]
        lines += ["| arrangement | connections | requests/s | of ceiling | vs corral "
                  "| p50 (ms) | p99 (ms) | errors | memory (MiB) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for connections in plan.connections:
            corral_point = results.point(case.slug, "corral", connections)
            for arrangement in plan.arrangements:
                p = results.point(case.slug, arrangement.key, connections)
                if p is None:
                    continue
                share = _share(p.rps / ceiling) if ceiling else "–"
                ratio = (f"{p.rps / corral_point.rps:.2f}"
                         if corral_point and corral_point.rps else "–")
                lines.append(f"| {p.arrangement} | {p.connections} | {p.rps:,.0f} | {share} "
                             f"| {ratio} | {_ms(p.p50_ms)} | {_ms(p.p99_ms)} | {p.errors} "
                             f"| {p.memory_mib:.0f} |")
        failed = [(who, why) for slug, who, why in results.failures if slug == case.slug]
        lines += [""] + [f"- {who}: not measured: {why}" for who, why in failed]
        lines += [""] if failed else []
    if results.notes:
        lines += ["## Left out", "", *[f"- {note}" for note in results.notes], ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def draw_charts(results: Results, plan: Plan) -> set[str]:
    """A bar chart per case in the out folder; the slugs drawn."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        say("matplotlib is not installed: no charts (pip install -e '.[bench]')")
        return set()
    drawn = set()
    for case in results.cases:
        points = [p for p in results.points if p.case == case.slug]
        if not points:
            continue
        keys = [a.key for a in plan.arrangements if any(p.arrangement == a.key for p in points)]
        width = 0.8 / len(plan.connections)
        fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(keys) + 2), 4.8))
        for i, connections in enumerate(plan.connections):
            offset = (i - (len(plan.connections) - 1) / 2) * width
            values = [getattr(results.point(case.slug, key, connections), "rps", 0)
                      for key in keys]
            ax.bar([x + offset for x in range(len(keys))], values, width,
                   label=f"{connections} connection{'s' if connections > 1 else ''}")
        title = f"{case.title}, {plan.processes} worker processes"
        ceiling = results.ceilings.get(case.slug)
        highest = max(p.rps for p in points)
        if ceiling and ceiling <= 3 * highest:
            ax.axhline(ceiling, linestyle="--", color="grey", label="in-process ceiling")
        elif ceiling:  # a line that far up would flatten every bar
            title += f"\n(in-process ceiling {ceiling:,.0f} req/s, off the scale)"
        ax.yaxis.set_major_formatter(matplotlib.ticker.StrMethodFormatter("{x:,.0f}"))
        ax.set_xticks(range(len(keys)), keys, rotation=25, ha="right")
        ax.set_ylabel("requests per second")
        ax.set_title(title)
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(plan.out / f"{case.slug}.png", dpi=100)
        plt.close(fig)
        drawn.add(case.slug)
    return drawn


def write_results(results: Results, plan: Plan) -> str:
    plan.out.mkdir(parents=True, exist_ok=True)
    charts = draw_charts(results, plan)
    table = render_markdown(results, plan, charts)
    (plan.out / "results.md").write_text(table)
    data = {**results.header, "command": plan.command, "processes": plan.processes,
            "duration": plan.duration, "ceilings": results.ceilings,
            "cases": [case.slug for case in results.cases],
            "points": [asdict(p) for p in results.points],
            "failures": results.failures, "notes": results.notes}
    (plan.out / "results.json").write_text(json.dumps(data, indent=2) + "\n")
    return table


# -- the command ---------------------------------------------------------------------

def _names(text: str, allowed, what: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in allowed]
    if unknown or not names:
        raise ValueError(f"unknown {what} {', '.join(unknown) or '(none)'}; "
                         f"choose from {', '.join(allowed)}")
    return names


def _counts(text: str) -> list[int]:
    try:
        counts = [int(n) for n in text.split(",") if n.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise ValueError(f"--connections: {text!r} is not a list of counts such as 1,32,256")
    return counts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="a short run: 32 connections, SQLite only, 3 s per point, "
                        f"arrangements {','.join(QUICK)} (under three minutes)")
    parser.add_argument("--duration", type=int, metavar="SECONDS",
                        help="seconds wrk measures each point (default 10, quick 3)")
    parser.add_argument("--warmup", type=int, metavar="SECONDS",
                        help="seconds of unmeasured load after each start (default 2, quick 1)")
    parser.add_argument("--connections", metavar="N,N,...",
                        help="wrk connection counts (default 1,32,256, quick 32)")
    parser.add_argument("--only", metavar="NAME,...",
                        help="arrangements to run, of " + ", ".join(BY_KEY)
                        + " (default: all that are installed)")
    parser.add_argument("--pages", metavar="NAME,...", default="hello,time,db",
                        help="pages to measure, of hello, time, db (default: all)")
    parser.add_argument("--databases", metavar="NAME,...",
                        help="databases for the site's pages, of sqlite, mariadb, postgresql "
                        "(default: all that are reachable, quick: sqlite)")
    parser.add_argument("--processes", type=int, default=2, metavar="N",
                        help="worker processes of every arrangement (default 2)")
    parser.add_argument("--wrk-threads", type=int, default=1, metavar="N",
                        help="wrk threads (default 1: it shares the machine with the servers)")
    parser.add_argument("--durable", action="store_true",
                        help="keep each database's own commit flushing (by default the "
                        "bench's databases do not wait for the disk; see docs/benchmarks.md)")
    parser.add_argument("--site", type=Path, default=SAMPLE, metavar="PATH",
                        help="the sample Django site (default: examples/django-site)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), metavar="DIR",
                        help="where results.md, results.json and the charts go "
                        "(default bench-results)")


def make_plan(args: argparse.Namespace) -> Plan:
    """The plan, or ValueError naming the argument that is wrong."""
    quick = args.quick
    connections = _counts(args.connections or ("32" if quick else "1,32,256"))
    keys = _names(args.only, BY_KEY, "arrangement") if args.only else \
        list(QUICK if quick else BY_KEY)
    arrangements = [a for a in ARRANGEMENTS if a.key in keys]
    pages = _names(args.pages, PAGES, "page")
    databases = _names(args.databases or ("sqlite" if quick else "sqlite,mariadb,postgresql"),
                       DATABASES, "database")
    duration = args.duration or (3 if quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if quick else 2)
    if duration < 1 or warmup < 1 or args.processes < 1 or args.wrk_threads < 1:
        raise ValueError("--duration, --warmup, --processes and --wrk-threads must be 1 or more")
    if set(pages) - {"hello"} and not (args.site / "manage.py").is_file():
        raise ValueError(f"--site: {args.site} is not the sample Django site "
                         "(use --pages hello without it)")
    return Plan(pages, databases, arrangements, connections, duration, warmup,
                args.processes, args.wrk_threads, args.site.resolve(), args.out, args.durable,
                " ".join(["corral", *sys.argv[1:]]))


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM: the same clean-up as Ctrl-C


def main(args: argparse.Namespace) -> int:
    try:
        plan = make_plan(args)
    except ValueError as exc:
        print(f"corral bench: {exc}", file=sys.stderr)
        return 2
    wrk = find_program("wrk")
    if wrk is None:
        print("corral bench: wrk is not installed (Debian: apt-get install wrk)",
              file=sys.stderr)
        return 2
    notes = []
    for arrangement in list(plan.arrangements):
        why = arrangement.missing()
        if why:
            say(f"{arrangement.key} left out: {why}")
            notes.append(f"{arrangement.key} left out: {why}")
            plan.arrangements.remove(arrangement)
    if not plan.arrangements:
        print("corral bench: none of the chosen arrangements can run here", file=sys.stderr)
        return 2
    results = Results(describe_machine(wrk, plan.arrangements), notes=notes)
    cases = plan.cases()
    say(f"{len(cases)} cases x {len(plan.arrangements)} arrangements x "
        f"{len(plan.connections)} points of {plan.duration} s: "
        f"about {_duration(plan.estimate_seconds())}")
    started = time.monotonic()
    previous = signal.signal(signal.SIGTERM, _interrupt)
    interrupted = False
    try:
        # On tmpfs where there is one: the SQLite file lives in the site's
        # copy (see open_database).
        shm = "/dev/shm"
        where = shm if not plan.durable and os.access(shm, os.W_OK) else None
        with tempfile.TemporaryDirectory(prefix="corral-bench-", dir=where) as tmp:
            Runner(plan, wrk, results, Path(tmp)).run()
    except KeyboardInterrupt:
        interrupted = True
        say("interrupted: every server is stopped; writing what was measured")
    finally:
        signal.signal(signal.SIGTERM, previous)
    table = write_results(results, plan)
    sys.stdout.write(table)
    say(f"done in {_duration(time.monotonic() - started)}; "
        f"results in {plan.out / 'results.md'}")
    return 130 if interrupted else 0
