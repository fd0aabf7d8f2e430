"""Shared fixtures: real corral servers on port 0 over copies of test apps."""

from __future__ import annotations

import os

import pytest

from tests.harness import APPS, SAMPLE, ServerProcess, copy_app

# The suite runs as root in CI, on app folders root owns: without this every
# `corral serve` would refuse to run workers as root (tests/test_users.py
# checks the refusal and the switch to a real user without it).
os.environ["CORRAL_ALLOW_ROOT"] = "1"


@pytest.fixture(scope="module")
def sample_server(tmp_path_factory):
    """The bundled Django sample site, served from a fresh copy."""
    app = copy_app(SAMPLE, tmp_path_factory.mktemp("sample") / "site")
    server = ServerProcess(app).wait_ready()
    yield server
    server.stop()


def cases_config(app, processes: int = 2, server: str = "") -> str:
    """A corral.toml for the cases app, with a static mapping and a call log."""
    return (f'[app]\nwsgi = "cases:application"\nprocesses = {processes}\n'
            f'[env]\nPYTHONPATH = "."\nCASES_CALL_LOG = "{app / "calls.log"}"\n'
            f'[static]\n"/files/" = "public"\n'
            + (f"[server]\n{server}\n" if server else ""))


@pytest.fixture(scope="module")
def cases_server(tmp_path_factory):
    """The behaviour-per-path test app behind the front."""
    app = copy_app(APPS / "cases", tmp_path_factory.mktemp("cases") / "cases")
    (app / "public").mkdir()
    (app / "public" / "hello.txt").write_text("hello static\n")
    (app / "public" / ".secret").write_text("dotfile\n")
    (app / "corral.toml").write_text(cases_config(app))
    server = ServerProcess(app).wait_ready()
    server.calls = app / "calls.log"
    yield server
    server.stop()
