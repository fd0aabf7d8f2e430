"""`corral new TEMPLATE NAME`: a working project from one of the templates in
corral/templates/, with its own virtual environment and pinned dependencies
installed, ready for `corral serve`.  A failed run removes what it made.
"""

from __future__ import annotations

import keyword
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
PLACEHOLDER = "__project__"  # in template paths and text: the project's name
SECRET = "__secret_key__"
VENV = ".venv"
EXIT_FAILED = 1
EXIT_USAGE = 2

# What pip prints when the package index cannot be reached at all.
OFFLINE = re.compile(r"NewConnectionError|Failed to establish a new connection|"
                     r"Temporary failure in name resolution|Name or service not known|"
                     r"Network is unreachable|No route to host|ConnectTimeout|"
                     r"ReadTimeoutError|ProxyError|SSLError")
NOT_FOUND = re.compile(r"No matching distribution found|Could not find a version")


@dataclass(frozen=True)
class Template:
    name: str
    summary: str
    python: bool = True  # has a virtual environment with requirements.txt
    package: bool = False  # the name is also a Python package of the project
    program: str | None = None  # a program the site needs on PATH
    install_hint: str = ""


TEMPLATES = {t.name: t for t in (
    Template("django", "a Django project with the admin, SQLite, migrate and "
             "collectstatic as its deploy step", package=True),
    Template("flask", "a Flask app with a page template and static files"),
    Template("wsgi", "a bare WSGI callable, no framework"),
    Template("php", "a PHP site run by php-cgi, a FastCGI engine that corral supervises",
             python=False, program="php-cgi", install_hint="apt-get install php-cgi"),
)}
DEFAULT = "django"


class Failed(Exception):
    """A step that failed; str() is the message for the user."""


# Names a Django project package must not take: what it imports, and its
# own folders beside the package.
TAKEN = {"corral", "django", "asgiref", "sqlparse", "test", "tests", "static", "templates",
         "assets", "log"}


def project_name(folder: Path, package: bool) -> str:
    """The project's name in its files (and, with `package`, its Python
    package), from its folder's name.  Failed when it is not a usable module
    name, or would hide a module the project imports."""
    name = re.sub(r"[^0-9a-zA-Z_]", "_", folder.name).lower()
    if not name.isidentifier() or keyword.iskeyword(name):
        raise Failed(f"{folder.name!r} does not make a Python name; choose a name "
                     "of letters, digits and _ that starts with a letter")
    if package and (name in sys.stdlib_module_names or name in TAKEN):
        raise Failed(f"{name!r} would hide the Python module or folder of that name; "
                     "choose another name")
    return name


def template_files(template: Template) -> list[tuple[Path, Path]]:
    """(source, relative target) of each file of `template`.  Dotfiles are
    stored without their dot (`gitignore`), as package data skips dotfiles."""
    root = TEMPLATES_DIR / template.name
    found = []
    for source in sorted(root.rglob("*")):
        if not source.is_file() or "__pycache__" in source.parts or source.suffix == ".pyc":
            continue
        relative = source.relative_to(root)
        if relative.name == "gitignore":
            relative = relative.with_name(".gitignore")
        found.append((source, relative))
    return found


class Project:
    """One `corral new` run: what it made, so that a failure can remove it."""

    def __init__(self, template: Template, target: Path, out=sys.stdout) -> None:
        self.template = template
        self.target = target
        self.out = out
        self.made: list[Path] = []  # created by us, removed on failure, last first
        self.steps = 3 if template.python else 1
        self.step = 0

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def progress(self, text: str) -> None:
        self.step += 1
        self.say(f"  [{self.step}/{self.steps}] {text}")

    def note_made(self, path: Path) -> None:
        """Record the outermost folder or file of `path` that did not exist."""
        missing = path
        while not missing.parent.exists():
            missing = missing.parent
        if not missing.exists():
            self.made.append(missing)

    def write_files(self, name: str) -> None:
        self.progress("writing the project files")
        values = {PLACEHOLDER: name, SECRET: "corral-new-" + secrets.token_urlsafe(40)}
        for source, relative in template_files(self.template):
            relative = Path(*(part.replace(PLACEHOLDER, name) for part in relative.parts))
            path = self.target / relative
            self.note_made(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            text = source.read_text(encoding="utf-8")
            for key, value in values.items():
                text = text.replace(key, value)
            path.write_text(text, encoding="utf-8")
            if text.startswith("#!"):
                path.chmod(0o755)

    def create_venv(self) -> Path:
        venv = self.target / VENV
        self.progress(f"creating the virtual environment {VENV}/ "
                      f"(Python {sys.version.split()[0]})")
        self.note_made(venv)
        # The interpreter corral runs on, which corral's worker runs on too.
        done = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True,
                              text=True, errors="replace", stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            output = (done.stdout + done.stderr).strip()
            hint = ("; install the venv module (Debian, Ubuntu: apt-get install python3-venv)"
                    if "ensurepip" in output else "")
            raise Failed(f"cannot create the virtual environment{hint}:\n{indent(output)}")
        return venv / "bin" / "python"

    def install(self, python: Path) -> None:
        requirements = self.target / "requirements.txt"
        wanted = [line.split("#")[0].strip() for line in
                  requirements.read_text(encoding="utf-8").splitlines()]
        wanted = [w for w in wanted if w]
        if not wanted:
            self.progress("nothing to install: requirements.txt names no packages yet")
            return
        self.progress(f"installing {len(wanted)} pinned packages from requirements.txt")
        # pip reads PIP_INDEX_URL, PIP_FIND_LINKS, PIP_NO_INDEX and the rest
        # from the environment itself, so a local index or wheel folder works.
        command = [str(python), "-m", "pip", "install", "--disable-pip-version-check",
                   "--no-input", "--progress-bar", "off", "-r", str(requirements)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("PYTHONPATH", None)  # corral's own path must not leak into the venv's pip
        proc = subprocess.Popen(command, cwd=self.target, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace")
        said = []
        with proc:
            for line in proc.stdout:
                line = line.rstrip()
                if line:
                    said.append(line)
                    self.say(f"        {line}")
        if proc.returncode != 0:
            text = "\n".join(said)
            if OFFLINE.search(text):
                why = "cannot reach the package index (is this machine offline?)"
            elif NOT_FOUND.search(text):
                why = ("pip found no version of a pinned package: the package index "
                       "cannot be reached (is this machine offline?) or does not have it")
            else:
                why = f"pip failed (exit status {proc.returncode})"
            last = "\n".join(said[-20:])
            raise Failed(f"installing requirements.txt: {why}. pip's last lines:\n"
                         f"{indent(last)}\nFor an offline machine, point pip at a folder "
                         "of wheels: PIP_NO_INDEX=1 PIP_FIND_LINKS=/path/to/wheels")

    def remove_made(self) -> None:
        for path in reversed(self.made):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


def create(template_name: str, target: Path | str, force: bool = False,
           out=sys.stdout, err=sys.stderr) -> int:
    """Make the project; returns the exit status for `corral new`."""
    template = TEMPLATES.get(template_name)
    if template is None:
        print(f"corral new: no template {template_name!r}; choose one of "
              f"{', '.join(TEMPLATES)}", file=err)
        return EXIT_USAGE
    target = Path(target).absolute()
    if target.exists() and not target.is_dir():
        print(f"corral new: {target} exists and is not a folder", file=err)
        return EXIT_USAGE
    if target.is_dir() and any(target.iterdir()) and not force:
        print(f"corral new: {target} exists and is not empty; choose a new name, or "
              "give --force to write the project into it (files of the same name are "
              "replaced)", file=err)
        return EXIT_USAGE
    try:
        name = project_name(target, template.package)
    except Failed as exc:
        print(f"corral new: {exc}", file=err)
        return EXIT_USAGE

    project = Project(template, target, out)
    project.say(f"corral new: {template.name} project {name!r} in {target}")
    project.note_made(target)
    try:
        target.mkdir(parents=True, exist_ok=True)
        project.write_files(name)
        if template.python:
            project.install(project.create_venv())
    except (Failed, OSError, KeyboardInterrupt) as exc:
        project.remove_made()
        message = str(exc) if isinstance(exc, Failed) else (
            "interrupted" if isinstance(exc, KeyboardInterrupt) else f"{exc}")
        left = (f"removed what it had made in {target}" if target.exists()
                else "nothing was left behind")
        print(f"corral new: {message}\ncorral new: {left}", file=err)
        return 130 if isinstance(exc, KeyboardInterrupt) else EXIT_FAILED

    project.say(f"\nDone: {target}")
    if template.program and shutil.which(template.program) is None:
        project.say(f"Note: {template.program} is not installed; `corral serve` needs it "
                    f"({template.install_hint}).")
    shown = os.path.relpath(target)
    if shown.startswith(".."):
        shown = str(target)
    project.say(f"Serve it with:\n    corral serve {shlex.quote(shown)}\n"
                f"then open {url_of(target)}")
    return 0


def url_of(target: Path) -> str:
    """The URL the project's first HTTP bind answers at."""
    from corral.config import ConfigError, load
    try:
        binds = load(target).server["bind"]
    except ConfigError:
        return "http://127.0.0.1:8000/"
    for bind in binds:
        if bind.protocol == "http" and not bind.path:
            host = "127.0.0.1" if bind.host in ("0.0.0.0", "") else bind.host
            host = f"[{host}]" if ":" in host else host
            return f"http://{host}:{bind.port}/"
    return "http://127.0.0.1:8000/"
