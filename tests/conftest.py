"""Shared fixtures: real corral servers on port 0 over copies of test apps."""

from __future__ import annotations

import pytest

from tests.harness import APPS, SAMPLE, ServerProcess, copy_app


@pytest.fixture(scope="module")
def sample_server(tmp_path_factory):
    """The bundled Django sample site, served from a fresh copy."""
    app = copy_app(SAMPLE, tmp_path_factory.mktemp("sample") / "site")
    server = ServerProcess(app).wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cases_server(tmp_path_factory):
    """The behaviour-per-path test app behind the front."""
    app = copy_app(APPS / "cases", tmp_path_factory.mktemp("cases") / "cases")
    (app / "public").mkdir()
    (app / "public" / "hello.txt").write_text("hello static\n")
    (app / "corral.toml").write_text((app / "corral.toml").read_text() + (
        '\n[static]\n"/files/" = "public"\n'))
    server = ServerProcess(app).wait_ready()
    yield server
    server.stop()
