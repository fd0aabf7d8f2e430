"""[app] watch: files of the app matching its globs restart it with a new
generation whose cause names the file; a burst of changes makes one
restart; files that do not match, and .git, .venv, __pycache__ and the
deploy log, never do."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from corral.config import ConfigError, load
from tests.harness import ROOT, ServerProcess
from tests.test_restarts import get, restarts_app

GLOBS = 'watch = ["**/*.py", "templates/**/*.html"]'


def status(app) -> dict:
    done = subprocess.run([sys.executable, "-m", "corral", "status", str(app), "--json"],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture
def watched(tmp_path):
    app = restarts_app(tmp_path, app=GLOBS, processes=1,
                       deploy='command = ["python", "-c", "print(1)"]')
    for folder in ("templates/pages", "pkg", ".git", ".venv/lib", "__pycache__"):
        (app / folder).mkdir(parents=True)
    (app / "templates" / "pages" / "home.html").write_text("<p>home</p>\n")
    (app / "notes.txt").write_text("not watched\n")
    server = ServerProcess(app).wait_ready()
    server.wait_for(r"watching .* for changes to \*\*/\*\.py, templates/\*\*/\*\.html")
    yield app, server
    server.stop()


def test_a_matching_change_restarts_and_others_do_not(watched):
    app, server = watched
    first = int(get(server.port, "/")[1])
    # None of these count; written first, so that had they counted they
    # would be in the same burst and named in the cause, or restart first.
    (app / "notes.txt").write_text("changed\n")
    (app / ".git" / "hook.py").write_text("x = 1\n")
    (app / ".venv" / "lib" / "site.py").write_text("x = 1\n")
    (app / "__pycache__" / "cached.py").write_text("x = 1\n")
    with open(app / "log" / "deploy.log", "a") as f:
        f.write("a line\n")
    (app / "templates" / "pages" / "home.txt").write_text("not html\n")
    # The one that does: a template two folders down.
    (app / "templates" / "pages" / "home.html").write_text("<p>new</p>\n")
    server.wait_for(r"generation 2 of app serves")
    assert int(get(server.port, "/")[1]) != first
    [restart] = status(app)["restarts"]
    assert restart["cause"] == "watch: templates/pages/home.html changed" and restart["ok"]
    assert server.log.count(": restarting") == 1
    # Deleting a watched file is a change too.
    (app / "templates" / "pages" / "home.html").unlink()
    server.wait_for(r"generation 3 of app serves")
    assert status(app)["restarts"][-1]["cause"] == "watch: templates/pages/home.html changed"


def test_a_burst_of_changes_makes_one_restart(watched):
    app, server = watched
    # A `git pull` touching 50 files at once.
    for i in range(50):
        (app / "pkg" / f"mod{i:02}.py").write_text(f"VALUE = {i}\n")
    server.wait_for(r"generation 2 of app serves")
    # One file more, later: had the burst made a second restart, it would
    # be generation 3 and this one generation 4.
    (app / "app.py").write_text((app / "app.py").read_text() + "\n# edited\n")
    server.wait_for(r"generation 3 of app serves")
    restarts = status(app)["restarts"]
    assert [r["cause"] for r in restarts] == [
        "watch: pkg/mod00.py and 49 more files changed", "watch: app.py changed"]
    assert server.log.count(": restarting") == 2


def test_watch_globs_are_checked(tmp_path):
    for bad, problem in (('watch = "**/*.py"', "expected a list of globs"),
                         ('watch = ["../other/*.py"]', "leaves the app folder"),
                         ('watch = ["/etc/*.conf"]', "leaves the app folder")):
        app = restarts_app(tmp_path / str(abs(hash(bad))), app=bad)
        with pytest.raises(ConfigError) as raised:
            load(app)
        assert f"{app / 'corral.toml'}: [app] watch: " in str(raised.value)
        assert problem in str(raised.value)
