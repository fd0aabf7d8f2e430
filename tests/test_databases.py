"""End to end on database servers: `corral serve` on a copy of the sample Django site with
SAMPLE_DB=mariadb and SAMPLE_DB=postgresql, each on a fresh database that is dropped afterwards."""

from __future__ import annotations

import html
import os
import re
import secrets
import socket
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import psycopg
import pymysql
import pytest
import requests

from tests.harness import SAMPLE, ServerProcess, copy_app

# The servers the site is pointed at: root with an empty password (MariaDB) or trust
# auth (PostgreSQL), which is how they are set up on the development and CI machines.
SERVERS = {
    "mariadb": ("MariaDB", "127.0.0.1", 3306),
    "postgresql": ("PostgreSQL", "127.0.0.1", 5432),
}


def require_server(kind: str) -> None:
    """Skip when the server does not accept connections; under CI, fail instead, so a
    machine without the server can never pass these tests by skipping them."""
    label, host, port = SERVERS[kind]
    try:
        # A plain TCP connect tells "not running" apart from errors the driver would
        # report later (bad credentials, SQL), which must fail the test everywhere.
        socket.create_connection((host, port), timeout=5).close()
    except OSError as error:
        message = f"{label} server at {host}:{port} is unreachable ({error})"
        if "CI" in os.environ:
            pytest.fail(f"{message}; CI is set, so the database tests may not be skipped")
        pytest.skip(message)


def connect(kind: str, database: str):
    """A DB-API connection in autocommit, so every query sees what the workers committed
    (a MariaDB transaction left open would keep reading its first snapshot)."""
    _, host, port = SERVERS[kind]
    if kind == "mariadb":
        return pymysql.connect(host=host, port=port, user="root", password="",
                               database=database, charset="utf8mb4", autocommit=True)
    return psycopg.connect(host=host, port=port, user="root", dbname=database,
                           autocommit=True)


def administer(kind: str, statement: str) -> None:
    """CREATE or DROP DATABASE, from a database that always exists on the server."""
    admin = connect(kind, "test" if kind == "mariadb" else "postgres")
    with closing(admin), closing(admin.cursor()) as cursor:
        cursor.execute(statement)


@dataclass
class Site:
    kind: str
    database: str
    server: ServerProcess
    db: object  # the test's own connection to `database`

    def rows(self, sql: str, params: tuple = ()) -> list[tuple]:
        """The rows `sql` returns; none for a statement without a result."""
        # Both drivers use the %s paramstyle, so one query text serves both.
        with closing(self.db.cursor()) as cursor:
            cursor.execute(sql, params)
            if cursor.description is None:
                return []
            return [tuple(row) for row in cursor.fetchall()]


@pytest.fixture(scope="module", params=list(SERVERS))
def site(request, tmp_path_factory):
    """The sample site served by corral on its own new database on one server."""
    kind = request.param
    require_server(kind)
    # Unique per run, so parallel or aborted runs never share or reuse a database.
    database = f"corral_{os.getpid()}_{secrets.token_hex(4)}"
    administer(kind, f"CREATE DATABASE {database}"
               + (" CHARACTER SET utf8mb4" if kind == "mariadb" else ""))
    try:
        app = copy_app(SAMPLE, tmp_path_factory.mktemp(kind) / "site")
        server = ServerProcess(app, env={"SAMPLE_DB": kind, "SAMPLE_DB_NAME": database,
                                         "SAMPLE_DB_HOST": SERVERS[kind][1],
                                         "SAMPLE_DB_PORT": str(SERVERS[kind][2]),
                                         "SAMPLE_DB_USER": "root", "SAMPLE_DB_PASSWORD": ""})
        try:
            server.wait_ready()
            with closing(connect(kind, database)) as db:
                yield Site(kind, database, server, db)
        finally:
            # Stopped first: the workers keep connections open (CONN_MAX_AGE).
            server.stop()
    finally:
        # FORCE ends any connection a stray worker still holds, or the drop would fail.
        administer(kind, f"DROP DATABASE IF EXISTS {database}"
                   + (" WITH (FORCE)" if kind == "postgresql" else ""))


def test_deploy_step_migrates_the_new_database(site):
    text = (site.server.app_dir / "log" / "deploy.log").read_text()
    engine = "mysql" if site.kind == "mariadb" else "postgresql"
    assert f"deploy: database {engine} {site.database}" in text
    for migration in ("blog.0001_initial", "store.0001_initial", "bench.0001_initial"):
        assert f"Applying {migration}... OK" in text
    assert "deploy step finished: exit status 0" in text.splitlines()[-1]
    # The migrations really landed in that database, not in a default one.
    applied = site.rows("select app, name from django_migrations where name = %s",
                        ("0001_initial",))
    assert {"blog", "store", "bench"} <= {app for app, _ in applied}


def test_blog_lists_the_posts_of_the_database(site):
    # A post written straight into the database proves the page reads this database.
    published = datetime.now(UTC) - timedelta(minutes=1)
    if site.kind == "mariadb":
        published = published.replace(tzinfo=None)  # Django keeps UTC in naive DATETIMEs
    title = f"Written by the test into {site.database} <&>"
    site.rows("insert into blog_post (title, slug, body, published) values (%s, %s, %s, %s)",
              (title, site.database.replace("_", "-"), "Inserted directly.", published))
    titles = [row[0] for row in site.rows("select title from blog_post order by published desc")]
    assert len(titles) == 4 and titles[0] == title  # three seeded by the deploy step
    page = requests.get(site.server.url + "/blog/", timeout=10)
    assert page.status_code == 200
    positions = [page.text.find(html.escape(t)) for t in titles]
    assert -1 not in positions, (titles, page.text)
    assert positions == sorted(positions)  # newest first, as the model orders them


def test_bench_db_adds_exactly_one_row(site):
    before = site.rows("select count(*) from bench_hit")[0][0]
    page = requests.get(site.server.url + "/bench/db", timeout=10)
    assert page.status_code == 200
    assert site.rows("select count(*) from bench_hit")[0][0] == before + 1
    newest = site.rows("select stamp from bench_hit order by id desc limit 1")[0][0]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}", newest)
    assert newest in page.text  # the page shows the row it stored


def test_store_order_with_csrf_is_stored(site):
    with requests.Session() as session:
        page = session.get(site.server.url + "/store/", timeout=10)
        assert page.status_code == 200
        action = re.search(r'action="(/store/order/(\d+)/)"', page.text)
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
        email = f"buyer-{site.database}@example.com"
        done = session.post(site.server.url + action.group(1), timeout=10,
                            allow_redirects=False,
                            data={"quantity": 3, "email": email, "csrfmiddlewaretoken": token})
        assert done.status_code == 302, done.text
        thanks = session.get(site.server.url + done.headers["Location"], timeout=10)
        assert thanks.status_code == 200 and email in thanks.text
    rows = site.rows("select product_id, quantity from store_order where email = %s", (email,))
    assert rows == [(int(action.group(2)), 3)]
