"""corral.toml: every mistake stops `corral serve` with one line naming the
file, the key and the fix; defaults for a bare Django project; the generated
reference in docs/config.md is current."""

from __future__ import annotations

import subprocess
import sys

import pytest

from corral import settings
from corral.config import Bind, ConfigError, load
from tests.harness import APPS, ROOT, SAMPLE, ServerProcess, copy_app


def write(tmp_path, text: str, app: bool = True):
    (tmp_path / "corral.toml").write_text(text)
    if app:
        (tmp_path / "app.py").write_text(
            "def application(environ, start_response):\n"
            "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
            "    return [b'ok']\n")
    return tmp_path


@pytest.mark.parametrize("text, key, words", [
    ('[app]\nwsgi = "app:application"\nprocesses = "two"\n', "[app] processes", "integer"),
    ('[app]\nwsgi = "app:application"\nprocesses = 0\n', "[app] processes", "at least 1"),
    ('[app]\nwsgi = "app:application"\nworkers = 2\n', "[app] workers", "unknown key"),
    ('[app]\nwsgi = "app:application"\n[apps]\n', "[apps]", "unknown section"),
    ('[app]\nwsgi = "app:application"\n[static]\n"/s/" = "missing"\n', '[static] "/s/"',
     "does not exist"),
    ('[app]\nwsgi = "app:application"\n[deploy]\nfile = "nope.py"\n', "[deploy] file",
     "does not exist"),
    ('[app]\nwsgi = "app:application"\n[env]\nDEPLOY_FILE = "nope.py"\n', "[env] DEPLOY_FILE",
     "does not exist"),
    ('[app]\nwsgi = "app:application"\n[env]\nDEBUG = 1\n', "[env] DEBUG", "string"),
    ('[app]\nwsgi = "app"\n', "[app] wsgi", "module:callable"),
    ('[app]\nwsgi = "app:application"\n[server]\nbind = "nowhere"\n', "[server] bind",
     "HOST:PORT"),
    ('[app]\nwsgi = "app:application"\n[deploy]\ncommand = "migrate"\n', "[deploy] command",
     "list of strings"),
    ('[app\n', None, "not valid TOML"),
])
def test_config_errors_name_file_key_and_fix(tmp_path, text, key, words):
    write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(tmp_path)
    message = str(info.value)
    assert str(tmp_path / "corral.toml") in message
    if key:
        assert key in message
    assert words in message
    assert "Fix:" in message


def test_unimportable_wsgi_callable_stops_serve(tmp_path):
    write(tmp_path, '[app]\nwsgi = "nosuchmodule:application"\n')
    server = ServerProcess(tmp_path)
    try:
        code = server.proc.wait(60)
    finally:
        server.kill()
    assert code == 2
    assert "[app] wsgi = 'nosuchmodule:application'" in server.log
    assert str(tmp_path / "corral.toml") in server.log
    assert "No module named 'nosuchmodule'" in server.log


def test_defaults(tmp_path):
    write(tmp_path, '[app]\nwsgi = "app:application"\n')
    config = load(tmp_path)
    assert config.processes == 2
    assert config.mount == ""
    assert [str(b) for b in config.server["bind"]] == ["127.0.0.1:8000"]
    assert config.deploy.argv is None
    assert config.env["PYTHONPATH"] == str(tmp_path)


def test_deploy_names_of_the_original(tmp_path):
    (tmp_path / "setup_db.py").write_text("print('deployed')\n")
    write(tmp_path, '[app]\nwsgi = "app:application"\n[env]\n'
          'DEPLOY_FILE = "setup_db.py"\nDEPLOY_LOG = "logs/d.log"\n')
    config = load(tmp_path)
    assert config.deploy.argv[-1] == str(tmp_path / "setup_db.py")
    assert config.deploy.log == tmp_path / "logs" / "d.log"


def test_bare_django_project_is_recognised(tmp_path):
    app = copy_app(SAMPLE, tmp_path / "site")
    (app / "corral.toml").unlink()
    config = load(app)
    assert config.wsgi == "mysite.wsgi:application"
    assert config.env["DJANGO_SETTINGS_MODULE"] == "mysite.settings"
    assert config.deploy.argv[1:] == ["manage.py", "migrate", "--noinput"]


def test_folder_without_an_app(tmp_path):
    result = subprocess.run([sys.executable, "-m", "corral", "serve", str(tmp_path)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "no corral.toml and no manage.py" in result.stderr


@pytest.mark.parametrize("text, protocol, shown", [
    ("127.0.0.1:0", "http", "127.0.0.1:0"),
    ("[::1]:8080", "http", "[::1]:8080"),
    ("unix:/run/a.sock", "http", "unix:/run/a.sock"),
    ("fastcgi+unix:/run/a.sock", "fastcgi", "fastcgi+unix:/run/a.sock"),
    ("fastcgi+tcp:127.0.0.1:9000", "fastcgi", "fastcgi+tcp:127.0.0.1:9000"),
])
def test_bind_forms(text, protocol, shown):
    bind = Bind.parse(text)
    assert (bind.protocol, str(bind)) == (protocol, shown)


@pytest.mark.parametrize("text", ["localhost", "fastcgi+unix:", "fastcgi+tcp:x", ":99999",
                                  "unix:", "[::1:8000", "0.0.0.0:0:0", " 127.0.0.1:8000",
                                  "::1:8000"])
def test_bad_bind_forms_are_refused(text):
    with pytest.raises(ValueError):
        Bind.parse(text)


def test_bind_flag_is_checked():
    result = subprocess.run([sys.executable, "-m", "corral", "serve", str(APPS / "cases"),
                             "--bind", "localhost"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "--bind" in result.stderr


def test_config_reference_is_current():
    """docs/config.md is generated from corral/settings.py; regenerate with
    `python -m corral.settings > docs/config.md`."""
    assert (ROOT / "docs" / "config.md").read_text() == settings.markdown()
