"""`corral new` for every template, installed from a local wheel folder (no
network during the run), then served by `corral serve` with the project's own
virtual environment; refusals, and failed installs that leave nothing behind.
"""

from __future__ import annotations

import os
import re
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from corral.config import ConfigError, load
from corral.new import TEMPLATES, TEMPLATES_DIR
from tests.harness import ROOT, ServerProcess, request

# corral imported from this checkout without PYTHONPATH, so the workers it
# starts with a project's venv find corral only the way corral arranges it.
CORRAL = [sys.executable, "-c",
          f"import sys; sys.path.insert(0, {str(ROOT)!r}); from corral.cli import main; "
          "sys.exit(main())"]
PYTHON_TEMPLATES = [name for name, t in TEMPLATES.items() if t.python]


class CorralProcess(ServerProcess):
    """A ServerProcess with the whole command line and environment given
    (nothing added), and descriptors to pass."""

    def __init__(self, command: list[str], env: dict[str, str],
                 pass_fds: tuple[int, ...] = ()) -> None:
        self.app_dir = None
        self.lines = []
        self._changed = threading.Condition()
        self._ended = False
        self.proc = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     stdin=subprocess.DEVNULL, env=env, text=True,
                                     errors="replace", pass_fds=pass_fds)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.url = ""
        self.port = 0


def clean_env(**extra: str) -> dict[str, str]:
    """Our environment without PYTHONPATH or the machine's pip settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.pop("PYTHONPATH", None)
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def wheels(pytestconfig) -> Path:
    """A folder with a wheel of every pinned requirement of the templates,
    kept in the pytest cache: filled from PyPI once, then reused offline."""
    cache = getattr(pytestconfig, "cache", None)  # None with -p no:cacheprovider
    folder = (cache.mkdir("corral-new-wheels") if cache is not None
              else Path(tempfile.gettempdir()) / "corral-new-wheels")
    folder.mkdir(exist_ok=True)
    requirements = []
    for name in PYTHON_TEMPLATES:
        requirements += ["-r", str(TEMPLATES_DIR / name / "requirements.txt")]
    base = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary", ":all:",
            "-d", str(folder), *requirements]
    env = clean_env()
    offline = subprocess.run([*base, "--no-index", "--find-links", str(folder)], env=env,
                             capture_output=True, text=True)
    if offline.returncode != 0:
        online = subprocess.run(base, env=env, capture_output=True, text=True)
        if online.returncode != 0:
            message = ("cannot fill the wheel cache for the templates from PyPI: "
                       + online.stderr.strip().splitlines()[-1])
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
    return folder


def corral_new(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([*CORRAL, "new", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def offline_env(wheels: Path) -> dict[str, str]:
    return clean_env(PIP_NO_INDEX="1", PIP_FIND_LINKS=str(wheels))


@pytest.fixture(scope="module")
def made(tmp_path_factory, wheels):
    """`corral new TEMPLATE` run once per template, into a fresh folder."""
    cache = {}

    def make(template: str):
        if template not in cache:
            if template == "php":
                php_cgi()
            parent = tmp_path_factory.mktemp(f"new-{template}")
            done = corral_new(template, f"{template}site", cwd=parent, env=offline_env(wheels))
            assert done.returncode == 0, done.stdout + done.stderr
            cache[template] = (parent / f"{template}site", done)
        return cache[template]
    return make


def php_cgi() -> None:
    from tests.harness import require_tool
    require_tool("php-cgi")


def serve(app: Path) -> CorralProcess:
    return CorralProcess([*CORRAL, "serve", str(app), "--bind", "127.0.0.1:0"],
                         clean_env()).wait_ready()


def get(port: int, target: str) -> tuple[int, dict, bytes]:
    status, headers, body, _ = request(
        port, f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode(), timeout=30)
    return status, headers, body


# -- what `corral new` makes ---------------------------------------------------

@pytest.mark.parametrize("template", list(TEMPLATES))
def test_new_makes_a_complete_project(made, template):
    """Every template gives a corral.toml that loads, a .gitignore, a README,
    pinned requirements and a venv (for Python), no placeholder left, and
    ends with the command and URL to serve it."""
    app, done = made(template)
    out = done.stdout
    assert re.search(r"\[1/\d\] writing the project files", out)
    assert f"corral serve {app.name}" in out and "http://127.0.0.1:8000/" in out
    for name in ("corral.toml", ".gitignore", "README.md"):
        assert (app / name).is_file(), name
    config = load(app)
    assert config.deploy.argv, "every template has a deploy step"
    for path in app.rglob("*"):
        if ".venv" in path.parts or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        assert "__project__" not in text and "__secret_key__" not in text, path
    if TEMPLATES[template].python:
        assert config.python == str(app / ".venv" / "bin" / "python")
        lines = [line.strip() for line in (app / "requirements.txt").read_text().splitlines()]
        pins = [line for line in lines if line and not line.startswith("#")]
        assert all(re.fullmatch(r"[\w.-]+==[\w.]+", pin) for pin in pins), pins
        assert "Installing" in out or not pins
    if template == "django":
        assert "installing 3 pinned packages" in out and "Successfully installed" in out
        assert os.access(app / "manage.py", os.X_OK)
        assert (app / "djangosite" / "settings.py").is_file()
        assert (app / "static" / ".gitignore").is_file()


def test_secret_key_is_made_for_the_project(made):
    """The Django template's key is made for each project, not shipped."""
    app, _ = made("django")
    key = re.compile(r'"DJANGO_SECRET_KEY", "([^"]+)"')
    ours = key.search((app / "djangosite" / "settings.py").read_text()).group(1)
    shipped = key.search((TEMPLATES_DIR / "django" / "__project__" / "settings.py")
                         .read_text()).group(1)
    assert ours != shipped and len(ours) > 40


# -- serving what it made --------------------------------------------------------

def test_django_project_serves_after_its_deploy_step(made):
    """The home page, the admin's CSS collected by the deploy step and served
    by the front, the admin login, and the migrations in the database; the
    workers and the deploy step ran with the project's .venv."""
    app, _ = made("django")
    server = serve(app)
    try:
        status, _, body = get(server.port, "/")
        assert status == 200 and b"djangosite works" in body and b"Django 5." in body
        status, headers, body = get(server.port, "/static/admin/css/base.css")
        assert status == 200 and headers["content-type"].startswith("text/css") and body
        status, _, body = get(server.port, "/static/site.css")
        assert status == 200 and b"font-family" in body
        status, _, body = get(server.port, "/admin/login/")
        assert status == 200 and b"csrfmiddlewaretoken" in body
        venv_python = str(app / ".venv" / "bin" / "python")
        assert f"run with {venv_python}" in server.log
        assert f"deploy step of djangosite started: {venv_python}" in server.log
    finally:
        assert server.stop() == 0
    deploy_log = (app / "log" / "deploy.log").read_text()
    assert "Applying auth.0001_initial... OK" in deploy_log and "deploy: done" in deploy_log
    with sqlite3.connect(app / "db.sqlite3") as db:
        applied = db.execute("SELECT count(*) FROM django_migrations").fetchone()[0]
        db.execute("SELECT count(*) FROM auth_user").fetchone()
    assert applied > 10


def test_flask_project_serves(made):
    """Flask is in the project's venv only; its page and static file answer."""
    app, _ = made("flask")
    server = serve(app)
    try:
        status, _, body = get(server.port, "/")
        assert status == 200 and b"flasksite works" in body and b"Flask 3." in body
        status, _, body = get(server.port, "/static/site.css")
        assert status == 200 and b"font-family" in body
    finally:
        assert server.stop() == 0
    assert "deploy: done" in (app / "log" / "deploy.log").read_text()
    assert (app / "instance").is_dir()


def test_wsgi_project_runs_on_its_venv(made):
    """The worker's sys.prefix is the project's .venv, though corral runs on
    another interpreter and is not installed in that venv."""
    app, _ = made("wsgi")
    assert not list((app / ".venv").glob("lib/python*/site-packages/corral*"))
    server = serve(app)
    try:
        status, _, body = get(server.port, "/some/path")
        assert status == 200 and b"wsgisite works" in body
        assert f"from {app / '.venv'}.".encode() in body
        assert b"<code>/some/path</code>" in body
    finally:
        assert server.stop() == 0
    assert f"in {app / '.venv'}" in (app / "log" / "deploy.log").read_text()


def test_php_project_serves(made):
    """php-cgi behind the front, its stylesheet served by the front, and its
    deploy step (php-cgi -f deploy.php) has made data/."""
    app, _ = made("php")
    server = serve(app)
    try:
        status, _, body = get(server.port, "/")
        assert status == 200 and b"phpsite works" in body and b"through php-cgi" in body
        status, _, _ = get(server.port, "/no/such/page")
        assert status == 404
        status, _, body = get(server.port, "/assets/site.css")
        assert status == 200 and b"font-family" in body
    finally:
        assert server.stop() == 0
    assert (app / "data").is_dir()
    assert "deploy: done" in (app / "log" / "deploy.log").read_text()


def test_new_serve_serves_at_once(tmp_path, wheels):
    """`--serve` goes straight from making the project to serving it."""
    server = CorralProcess([*CORRAL, "new", "wsgi", str(tmp_path / "now"), "--serve",
                            "--bind", "127.0.0.1:0"], offline_env(wheels)).wait_ready()
    try:
        status, _, body = get(server.port, "/")
        assert status == 200 and b"now works" in body
    finally:
        assert server.stop() == 0


# -- refusals and failures ---------------------------------------------------------

def test_refuses_a_folder_that_is_not_empty(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine\n")
    done = corral_new("flask", "busy", cwd=tmp_path, env=clean_env())
    assert done.returncode == 2 and "is not empty" in done.stderr and "--force" in done.stderr
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("name, why", [("django", "would hide the Python module"),
                                       ("9lives", "does not make a Python name")])
def test_refuses_a_name_that_cannot_be_a_package(tmp_path, name, why):
    done = corral_new("django", name, cwd=tmp_path, env=clean_env())
    assert done.returncode == 2 and why in done.stderr
    assert not (tmp_path / name).exists()


def test_offline_install_fails_clearly_and_leaves_nothing(tmp_path):
    """An index that cannot be reached: a clear message, the folder gone."""
    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        env = clean_env(PIP_INDEX_URL=f"http://127.0.0.1:{closed.getsockname()[1]}/simple",
                        PIP_RETRIES="1", PIP_TIMEOUT="5")
        done = corral_new("flask", "offline", cwd=tmp_path, env=env)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "installing requirements.txt: cannot reach the package index" in done.stderr
    assert "PIP_FIND_LINKS" in done.stderr and "nothing was left behind" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_failed_install_with_force_keeps_what_was_there(tmp_path):
    """--force writes into a folder that has files; when the install fails,
    only what corral new made is removed."""
    folder = tmp_path / "kept"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine\n")
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    done = corral_new("flask", "kept", "--force", cwd=tmp_path,
                      env=clean_env(PIP_NO_INDEX="1", PIP_FIND_LINKS=str(empty)))
    assert done.returncode == 1
    assert "pip found no version of a pinned package" in done.stderr
    assert "removed what it had made" in done.stderr
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]
    assert (folder / "notes.txt").read_text() == "mine\n"


# -- a project's own virtual environment -------------------------------------------

def fake_venv(app: Path, folder: str, version: str, python: bool = True) -> Path:
    """A folder that looks like a venv to corral: pyvenv.cfg and bin/python."""
    (app / folder / "bin").mkdir(parents=True)
    (app / folder / "pyvenv.cfg").write_text(f"home = /usr/bin\nversion = {version}\n")
    if python:
        (app / folder / "bin" / "python").symlink_to(sys.executable)
    return app / folder / "bin" / "python"


def wsgi_app(tmp_path: Path) -> Path:
    app = tmp_path / "app"
    app.mkdir(parents=True)
    (app / "corral.toml").write_text('[app]\nwsgi = "app:application"\n'
                                     '[deploy]\ncommand = ["python", "-c", "pass"]\n')
    return app


def test_venv_folder_is_found_and_used_for_the_deploy_step(tmp_path):
    app = wsgi_app(tmp_path)
    assert load(app).python == sys.executable  # no venv: corral's own interpreter
    python = fake_venv(app, "venv", "3.11.7")
    config = load(app)
    assert config.python == str(python) and config.deploy.argv[0] == str(python)


def test_venv_too_old_or_broken_is_a_config_error(tmp_path):
    app = wsgi_app(tmp_path)
    fake_venv(app, ".venv", "3.8.10")
    with pytest.raises(ConfigError, match=r"has Python 3\.8; corral's worker needs 3\.11"):
        load(app)
    other = wsgi_app(tmp_path / "b")
    fake_venv(other, ".venv", "3.12.1", python=False)
    with pytest.raises(ConfigError, match=r"has no working \.venv/bin/python"):
        load(other)
