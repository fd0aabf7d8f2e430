"""End to end: `corral serve` on a copy of the bundled Django site, checked
with a real HTTP client, a real SQLite database and real worker processes."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time

import requests

from tests.harness import SAMPLE, ServerProcess, copy_app


def test_home_page_and_its_css_from_the_front(sample_server):
    page = requests.get(sample_server.url + "/", timeout=10)
    assert page.status_code == 200
    assert "/media/site.css" in page.text
    css = requests.get(sample_server.url + "/media/site.css", timeout=10)
    assert css.status_code == 200
    assert css.headers["Content-Type"].startswith("text/css")
    assert css.content == (SAMPLE / "mysite" / "media" / "site.css").read_bytes()
    # Served by the front, not Django: the front's validators are present.
    assert css.headers["ETag"] and css.headers["Last-Modified"]
    again = requests.get(sample_server.url + "/media/site.css", timeout=10,
                         headers={"If-None-Match": css.headers["ETag"]})
    assert again.status_code == 304 and again.content == b""
    logo = requests.get(sample_server.url + "/media/logo.png", timeout=10)
    assert logo.status_code == 200 and logo.content.startswith(b"\x89PNG")


def test_blog_list_comes_from_the_database(sample_server):
    db = sqlite3.connect(sample_server.app_dir / "db.sqlite3")
    titles = [row[0] for row in db.execute("select title from blog_post")]
    db.close()
    assert titles
    page = requests.get(sample_server.url + "/blog/", timeout=10)
    assert page.status_code == 200
    for title in titles:
        assert title in page.text


def test_store_order_with_csrf_is_stored(sample_server):
    session = requests.Session()
    page = session.get(sample_server.url + "/store/", timeout=10)
    assert page.status_code == 200
    action = re.search(r'action="(/store/order/\d+/)"', page.text).group(1)
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
    email = f"buyer{os.getpid()}@example.com"
    # Without the token Django refuses the POST: CSRF is really on.
    refused = requests.post(sample_server.url + action, data={"quantity": 2, "email": email},
                            timeout=10)
    assert refused.status_code == 403
    done = session.post(sample_server.url + action, timeout=10, allow_redirects=False,
                        data={"quantity": 2, "email": email, "csrfmiddlewaretoken": token})
    assert done.status_code == 302
    thanks = session.get(sample_server.url + done.headers["Location"], timeout=10)
    assert thanks.status_code == 200 and email in thanks.text
    db = sqlite3.connect(sample_server.app_dir / "db.sqlite3")
    rows = db.execute("select quantity from store_order where email = ?", (email,)).fetchall()
    db.close()
    assert rows == [(2,)]


def test_admin_login_and_its_css(sample_server):
    page = requests.get(sample_server.url + "/admin/login/", timeout=10)
    assert page.status_code == 200
    assert "/static/admin/css/base.css" in page.text
    css = requests.get(sample_server.url + "/static/admin/css/base.css", timeout=10)
    assert css.status_code == 200
    assert css.headers["Content-Type"].startswith("text/css")
    assert b"--primary" in css.content


def test_bench_pages(sample_server):
    first = requests.get(sample_server.url + "/bench/time", timeout=10)
    assert first.status_code == 200
    assert re.search(r"\d{2}:\d{2}:\d{2}\.\d{6}", first.text)
    db = sqlite3.connect(sample_server.app_dir / "db.sqlite3")
    before = db.execute("select count(*) from bench_hit").fetchone()[0]
    page = requests.get(sample_server.url + "/bench/db", timeout=10)
    after = db.execute("select count(*) from bench_hit").fetchone()[0]
    db.close()
    assert page.status_code == 200
    assert re.search(r"\d{2}:\d{2}:\d{2}\.\d{6}", page.text)
    assert after == before + 1


def test_cyrillic_route_matches(sample_server):  # K07, the Django half
    page = requests.get(sample_server.url + "/%D1%82%D0%B5%D1%81%D1%82/", timeout=10)
    assert page.status_code == 200
    assert "cyrillic" in page.text


def test_deploy_log_has_the_migrations_and_exit_status(sample_server):
    text = (sample_server.app_dir / "log" / "deploy.log").read_text()
    assert "Applying blog.0001_initial" in text or "No migrations to apply" in text
    assert "Applying" in text
    lines = text.splitlines()
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", lines[0])  # timestamped
    assert "deploy step finished: exit status 0" in lines[-1]


def test_killed_worker_is_replaced_and_nothing_fails(sample_server):
    workers = sample_server.worker_pids()
    assert len(workers) == 2
    victim = workers[0]
    os.kill(victim, signal.SIGKILL)
    for _ in range(20):
        assert requests.get(sample_server.url + "/bench/time", timeout=10).status_code == 200
    sample_server.wait_for(rf"worker pid {victim} .*exited unexpectedly \(killed by SIGKILL\)")
    sample_server.wait_for(rf"spawned worker pid (?!{victim})")
    line = sample_server.wait_for(r"worker pid \d+ ready", timeout=30)
    assert line
    deadline = time.monotonic() + 30
    while len(sample_server.worker_pids()) != 2 or victim in sample_server.worker_pids():
        assert time.monotonic() < deadline, sample_server.worker_pids()
        requests.get(sample_server.url + "/bench/time", timeout=10)
    assert victim not in sample_server.worker_pids()


def test_sigterm_stops_cleanly_with_no_process_left(tmp_path):
    app = copy_app(SAMPLE, tmp_path / "site")
    server = ServerProcess(app)
    try:
        server.wait_ready()
        workers = server.worker_pids()
        assert len(workers) == 2
        assert requests.get(server.url + "/", timeout=10).status_code == 200
    finally:
        assert server.stop() == 0
    for pid in workers:
        assert not os.path.exists(f"/proc/{pid}") or _is_zombie(pid), pid
    assert "stopped" in server.log


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_broken_config_names_the_key(tmp_path):
    app = copy_app(SAMPLE, tmp_path / "site")
    config = app / "corral.toml"
    config.write_text(config.read_text().replace("processes = 2", 'processes = "two"'))
    result = subprocess.run([sys.executable, "-m", "corral", "serve", str(app),
                             "--bind", "127.0.0.1:0"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0
    assert str(config) in result.stderr
    assert "[app] processes" in result.stderr
    assert "Fix:" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_first_request_waits_for_the_deploy_step(tmp_path):
    """A request sent before the deploy step ends is answered after it, from
    the migrated database, never with an error."""
    app = copy_app(SAMPLE, tmp_path / "site")
    server = ServerProcess(app)
    try:
        line = server.wait_for(r"listening on ")
        url = re.search(r"(http://[^\s,]+)", line).group(1)
        page = requests.get(url + "/blog/", timeout=120)
        assert page.status_code == 200
        deploy = (app / "log" / "deploy.log").read_text()
        assert "deploy step finished: exit status 0" in deploy
    finally:
        server.stop()
