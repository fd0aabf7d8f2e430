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
    section: str
    key: str
    kind: str  # str, int, float, bool, command, addresses
    default: Any
    help: str
    minimum: float | None = None
    cli: str | None = None  # the `corral serve` flag that overrides it, if any

    @property
    def name(self) -> str:
        return f"[{self.section}] {self.key}"


SETTINGS: tuple[Setting, ...] = (
    # [app]
    Setting("app", "wsgi", "str", None,
            "The WSGI callable as `module:callable`. Optional for a Django "
            "project: corral uses `<settings package>.wsgi:application`."),
    Setting("app", "processes", "int", 2,
            "How many worker processes serve the app.", minimum=1),
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
    Setting("server", "max_body", "int", 100 * 1024 * 1024,
            "Largest request body in bytes; larger ones get 413.", minimum=0),
    Setting("server", "max_header", "int", 64 * 1024,
            "Largest request head (request line and header fields) in bytes; "
            "larger ones get 431.", minimum=1024),
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
            "On stop, seconds in-flight requests get to finish before workers are killed.",
            minimum=0),
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
        out += [f"## [{section}]", ""]
        if section in FREE_SECTIONS:
            out += [FREE_SECTIONS[section], ""]
            continue
        out += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for s in SETTINGS:
            if s.section == section:
                default = "(none)" if s.default is None else f"`{s.default!r}`"
                flag = f" Command line: `{s.cli}`." if s.cli else ""
                out.append(f"| `{s.key}` | {s.kind} | {default} | {s.help}{flag} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(markdown())
