"""Every key of `corral.toml`, declared once: section, name, kind, default, help.

The loader in corral.config validates against this table, the CLI takes its
flags from it, and docs/config.md is generated from it (`python -m
corral.settings > docs/config.md`; a test fails when the file is stale).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Setting:
    section: str  # for the keys of named tables ([engines.NAME]): "engines"
    key: str
    kind: str  # str, int, float, bool, command, addresses, choice, table, globs,
    # processes (a number or a "MIN-MAX" range)
    default: Any
    help: str
    minimum: float | None = None
    cli: str | None = None  # the `corral serve` flag that overrides it, if any
    choices: tuple[str, ...] = ()  # the values a "choice" may take

    @property
    def name(self) -> str:
        if self.section in NAMED_SECTIONS:
            return f"[{self.section}.NAME] {self.key}"
        return f"[{self.section}] {self.key}"

    def name_in(self, table: str) -> str:
        """The key as written in one named table: `[engines.php] command`."""
        return f"[{self.section}.{table}] {self.key}"


# Sections made of named tables, each holding the keys declared for the
# section: [engines.php], [engines.perl], ...
NAMED_SECTIONS = {
    "engines": "Engines declared by name, each in its own `[engines.NAME]` table; "
               "`[app] engine = \"NAME\"` picks one. An engine has either a "
               "`command` that corral starts and supervises, one process per "
               "worker, or the `address` of a FastCGI server that is already "
               "running. `python` names the built-in engine and cannot be "
               "declared. See docs/engines.md.",
}
BUILTIN_ENGINE = "python"
TRANSPORTS = ("unix", "tcp")


SETTINGS: tuple[Setting, ...] = (
    # [app]
    Setting("app", "wsgi", "str", None,
            "The WSGI callable as `module:callable`. Optional for a Django "
            "project: corral uses `<settings package>.wsgi:application`."),
    Setting("app", "processes", "processes", 2,
            "How many worker processes serve the app: a number, or a range "
            "`\"MIN-MAX\"` (e.g. `\"0-4\"`). With a range the pool starts MIN "
            "workers, adds one while requests wait and no worker is free, up to "
            "MAX, and stops workers idle for `idle_timeout`, down to MIN; with "
            "MIN 0 the app costs no process until a request comes. For an "
            "engine with an `address`: how many connections corral keeps to "
            "that server (a number only). See docs/restarts.md.", minimum=1),
    Setting("app", "idle_timeout", "float", 60.0,
            "With a `processes` range: seconds a worker above MIN may stay idle "
            "before it is stopped.", minimum=0.1),
    Setting("app", "behind_limit", "float", 0.25,
            "With no worker free, a request may be sent to a busy `python` worker "
            "(two at most wait behind each), to begin the moment its current request "
            "ends (no gap while the front reads that end and sends the next); this "
            "is how long, in seconds, the "
            "current request may have run already for that. A request sent behind "
            "is taken back for any worker that frees up first, so it never runs "
            "twice and never waits on a slow one. 0: never send behind.", minimum=0),
    Setting("app", "spawn_mode", "choice", "direct",
            "How `python` workers start: `direct`, a fresh interpreter each that "
            "imports the app; or `preload`, where one preloader process per "
            "generation imports the app and forks the workers (faster spawns, "
            "shared memory; Django's database connections are closed in each "
            "forked worker). See docs/restarts.md.", choices=("direct", "preload")),
    Setting("app", "engine", "str", BUILTIN_ENGINE,
            "The engine the workers run: `python` (corral's own WSGI worker, "
            "serving `wsgi`) or the NAME of an `[engines.NAME]` table."),
    Setting("app", "transport", "choice", "unix",
            "How the front reaches the `python` engine's workers: a unix socket "
            "each, or a TCP port each on 127.0.0.1. Other engines set it in "
            "their `[engines.NAME]` table.", choices=TRANSPORTS),
    Setting("app", "root", "str", None,
            "For an engine other than `python`: the document root, relative to "
            "the app folder. The request path picks a script in it, which sets "
            "SCRIPT_FILENAME, SCRIPT_NAME, PATH_INFO and DOCUMENT_ROOT, as "
            "php-cgi needs."),
    Setting("app", "index", "str", "index.php",
            "With `root`: the script for a folder's URL and, when the path names "
            "no script that exists, the front controller, which gets the whole "
            "path as PATH_INFO."),
    Setting("app", "mount", "str", "/",
            "URL prefix the app is mounted at. The app sees it as SCRIPT_NAME "
            "and the rest of the path as PATH_INFO."),
    Setting("app", "queue", "int", 1024,
            "Requests that may wait for a free worker; past this, 503.",
            minimum=0),
    Setting("app", "queue_timeout", "float", 30.0,
            "Seconds a request may wait for a free worker before it gets 503.",
            minimum=0),
    Setting("app", "boot_timeout", "float", 60.0,
            "Seconds a worker may take to import the app and start answering.",
            minimum=1),
    Setting("app", "request_timeout", "float", 60.0,
            "Seconds a request may spend in the app. Past it the client gets "
            "504, the worker is asked to stop (a `python` worker logs the stuck "
            "request's Python stack), is killed `timeout_grace` seconds later, "
            "and is replaced. The request is never sent to another worker. "
            "0 means no limit. See docs/restarts.md.", minimum=0),
    Setting("app", "timeout_grace", "float", 5.0,
            "Seconds a worker that ran over `request_timeout` gets to exit "
            "after being asked (SIGUSR1 for `python` workers, SIGTERM for other "
            "engines) before it is killed with SIGKILL.", minimum=0),
    Setting("app", "max_requests", "int", 0,
            "Recycle a worker after this many requests (0: never). Recycling is "
            "graceful: the replacement is spawned and ready before the old "
            "worker leaves, and no request is cut.", minimum=0),
    Setting("app", "max_requests_jitter", "int", 0,
            "Each worker's `max_requests` is raised by a random 0 to this many, "
            "so that workers started together are not all recycled together.",
            minimum=0),
    Setting("app", "max_rss", "int", 0,
            "Recycle a worker whose resident memory (VmRSS in /proc/PID/status, "
            "checked after each request) is above this many MiB (0: never).",
            minimum=0),
    Setting("app", "max_lifetime", "float", 0.0,
            "Recycle a worker that has lived this many seconds (0: never); "
            "checked after each request and every second while it is idle.",
            minimum=0),
    Setting("app", "user", "str", None,
            "When corral runs as root: the user the workers and the deploy step "
            "run as (default: the owner of the app folder). Never root unless "
            "`corral serve --allow-root`. When corral does not run as root, only "
            "its own user may be named. See docs/users.md."),
    Setting("app", "group", "str", None,
            "With `user`: the group they run as (default: the user's primary "
            "group)."),
    Setting("app", "watch", "globs", [],
            "Restart the app (a new generation) when a file matching one of these "
            "globs, relative to the app folder, changes, e.g. `[\"**/*.py\", "
            "\"templates/**/*.html\"]`. `**` spans folders. Changes close together "
            "(a `git pull`) make one restart; .git, .venv, __pycache__ and the "
            "logs are never watched. See docs/restarts.md."),
    # [engines.NAME]
    Setting("engines", "command", "command", None,
            "The FastCGI program and its arguments, e.g. `[\"php-cgi\"]`, found on "
            "PATH (or relative to the app folder if it has a `/`). Each worker "
            "finds its listening socket on file descriptor 0, unless the command "
            "has a `{port}` placeholder: then it is given a port from `ports` "
            "and listens on 127.0.0.1 itself."),
    Setting("engines", "transport", "choice", "unix",
            "The socket each worker listens on: a unix socket, or a TCP port on "
            "127.0.0.1 (from `ports`, else any free port).", choices=TRANSPORTS),
    Setting("engines", "ports", "str", None,
            "With transport `tcp`: the range the workers' ports come from, as "
            "`LOW-HIGH` (e.g. `\"9100-9199\"`), with a port for every worker. "
            "Needed when the command has `{port}`."),
    Setting("engines", "env", "table", None,
            "Extra environment variables for the engine's processes, e.g. "
            "`{ PHP_FCGI_CHILDREN = \"0\" }`; the app's `[env]` wins over them."),
    Setting("engines", "address", "str", None,
            "Instead of `command`: a FastCGI server that is already running, at "
            "`HOST:PORT` or `unix:PATH`. corral connects to it, keeps "
            "`[app] processes` connections and reconnects when one is lost, but "
            "neither starts nor supervises it."),
    # [deploy]
    Setting("deploy", "file", "str", None,
            "A Python file run with the app's interpreter, folder and environment "
            "once per generation, before it serves. Same as DEPLOY_FILE in [env]."),
    Setting("deploy", "command", "command", None,
            "Instead of `file`: a command as a list of strings, "
            'e.g. `["python", "manage.py", "migrate", "--noinput"]`. '
            "`python` means the app's interpreter."),
    Setting("deploy", "log", "str", "log/deploy.log",
            "File (relative to the app folder) the deploy step's output, "
            "timestamps and exit status are appended to. Same as DEPLOY_LOG in [env]."),
    Setting("deploy", "timeout", "float", 600.0,
            "Seconds the deploy step may run before it is stopped and counted failed.",
            minimum=1),
    Setting("deploy", "hold", "float", 30.0,
            "Seconds a request may wait for a running deploy step before it "
            "gets 503 with Retry-After.", minimum=0),
    Setting("deploy", "exclusive", "bool", False,
            "At a restart, stop the old generation first (its in-flight requests "
            "finish) and run the deploy step alone, before the new workers start; "
            "requests wait up to `hold` seconds, then get 503 with Retry-After. "
            "For deploy steps that old code must not run beside (some schema "
            "migrations). Off: the old generation serves while the new one "
            "deploys, and keeps serving if it fails. See docs/restarts.md."),
    # [server]
    Setting("server", "bind", "addresses", "127.0.0.1:8000",
            "Where the front listens: one address or a list. `HOST:PORT` or "
            "`unix:PATH` speak HTTP (port 0 picks a free port); "
            "`fastcgi+unix:PATH` or `fastcgi+tcp:HOST:PORT` take FastCGI from a "
            "web server in front (nginx, Apache). Repeat `--bind` for several.",
            cli="--bind"),
    Setting("server", "access_log", "str", "-",
            "Where the access log (Apache combined format) goes: a file, `-` for "
            "standard error, or an empty string for none."),
    Setting("server", "socket_mode", "str", "0660",
            "Permissions of the unix sockets corral listens on (octal). 0660 lets "
            "the socket's group in: put the web server's user (e.g. www-data) in that "
            "group, or set `socket_group`; 0666 lets every local user connect."),
    Setting("server", "socket_group", "str", None,
            "Group the unix sockets corral listens on are given (e.g. `www-data`, "
            "so nginx can connect to a FastCGI listener); corral must be a member."),
    Setting("server", "access_log_format", "choice", "combined",
            "`combined` (Apache's) or `json`: one object a line with time, remote_addr, "
            "request_id, method, target, protocol, status, bytes, referer, user_agent, "
            "worker_pid, queue_ms (waiting for a worker), app_ms and total_ms.",
            choices=("combined", "json")),
    Setting("server", "metrics", "str", None,
            "Where Prometheus metrics are served at `/metrics`: `HOST:PORT` (e.g. "
            "`\"127.0.0.1:9108\"`) or `unix:PATH`, a listener of its own. Off by "
            "default. See docs/metrics.md."),
    Setting("server", "max_body", "int", 100 * 1024 * 1024,
            "Largest request body in bytes; larger ones get 413.", minimum=0),
    Setting("server", "max_header", "int", 64 * 1024,
            "Largest request head (request line and header fields) in bytes; "
            "larger ones get 431, as do heads of more than 200 fields.", minimum=1024),
    Setting("server", "max_url", "int", 8 * 1024,
            "Longest request target in bytes; longer ones get 414.", minimum=256),
    Setting("server", "header_timeout", "float", 20.0,
            "Seconds a client has to send a whole request head.", minimum=0.1),
    Setting("server", "body_timeout", "float", 60.0,
            "Seconds a client may stay silent while sending a request body.",
            minimum=0.1),
    Setting("server", "keepalive_timeout", "float", 60.0,
            "Seconds an idle keep-alive connection stays open.", minimum=0),
    Setting("server", "graceful_timeout", "float", 30.0,
            "On stop, and for the old generation at a restart, seconds in-flight "
            "requests get to finish before workers are killed.",
            minimum=0),
    Setting("server", "certificate", "str", None,
            "A PEM certificate chain (relative to the app folder): with `key`, the "
            "HTTP addresses of `bind` serve HTTPS, and the app sees "
            "`wsgi.url_scheme` https."),
    Setting("server", "key", "str", None,
            "The PEM private key of `certificate`."),
    Setting("server", "trusted_proxies", "addresses", [],
            "Addresses of proxies in front of corral (e.g. `[\"127.0.0.1\"]`). Only "
            "from these are X-Forwarded-For and X-Forwarded-Proto believed: the "
            "client's address becomes REMOTE_ADDR and `https` turns on HTTPS. From "
            "anyone else both headers are dropped."),
)

# [env] and [static] are tables of free keys, documented here by hand.
FREE_SECTIONS = {
    "env": "Environment variables for the workers and the deploy step. "
           "`PYTHONPATH` entries are relative to the app folder. The names "
           "DEPLOY_FILE and DEPLOY_LOG act like `[deploy] file` and `log`.",
    "static": "Static mappings: URL prefix = folder (relative to the app "
              "folder). The front serves these files itself; dotfiles and the "
              "config file are never served.",
}

BY_NAME = {(s.section, s.key): s for s in SETTINGS}
SECTIONS = tuple(dict.fromkeys(s.section for s in SETTINGS)) + tuple(FREE_SECTIONS)


def markdown() -> str:
    """The config reference, docs/config.md."""
    out = ["# corral.toml reference", "",
           "Generated from `corral/settings.py` by `python -m corral.settings`; "
           "do not edit by hand.", ""]
    for section in SECTIONS:
        if section in NAMED_SECTIONS:
            out += [f"## [{section}.NAME]", "", NAMED_SECTIONS[section], ""]
        else:
            out += [f"## [{section}]", ""]
        if section in FREE_SECTIONS:
            out += [FREE_SECTIONS[section], ""]
            continue
        out += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for s in SETTINGS:
            if s.section == section:
                default = "(none)" if s.default is None else f"`{s.default!r}`"
                flag = f" Command line: `{s.cli}`." if s.cli else ""
                kind = (" or ".join(f"`{c}`" for c in s.choices)
                        or {"processes": 'int or `"MIN-MAX"`'}.get(s.kind, s.kind))
                out.append(f"| `{s.key}` | {kind} | {default} | {s.help}{flag} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(markdown())
