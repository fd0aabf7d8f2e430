"""corral's worker against a FastCGI client nobody here wrote: `cgi-fcgi -bind`
from the FastCGI developer's kit (libfcgi) sends real requests to a real
worker, so the codec is not only checked against its own encoder.

cgi-fcgi turns its environment into PARAMS and its standard input into STDIN,
and writes the CGI response to its standard output.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.harness import WorkerProcess, require_tool

PEER_APP = "peer:application"


@pytest.fixture(scope="module", params=["unix", "tcp"])
def address(request):
    """A worker on each transport; yields the address cgi-fcgi connects to."""
    folder = Path(tempfile.mkdtemp(prefix="cp"))  # unix socket paths stay short
    # A repeated --bind replaces the first (argparse): port 0, and the
    # worker's "listening on" line names the port it got.
    extra = ("--bind", "127.0.0.1:0") if request.param == "tcp" else ()
    proc = WorkerProcess(PEER_APP, folder, *extra).wait_ready()
    line = next(line for line in proc.lines if "listening on " in line)
    where = line.split("listening on ", 1)[1]
    yield str(proc.path) if request.param == "unix" else where
    log = proc.stop()
    proc.proc.stderr.close()
    shutil.rmtree(folder, ignore_errors=True)
    # cgi-fcgi ends each connection cleanly: nothing for the log to report.
    assert "Traceback" not in log and "connection ended" not in log, log


def cgi_fcgi(address: str, env: dict[str, str], body: bytes = b"") -> tuple[int, dict, bytes]:
    """One request through cgi-fcgi: (status, headers lower-cased, body)."""
    tool = require_tool("cgi-fcgi")
    # Its whole environment becomes PARAMS: give it only the request's.
    done = subprocess.run([tool, "-bind", "-connect", address], env=env, input=body,
                          capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    head, sep, content = done.stdout.partition(b"\r\n\r\n")
    assert sep, f"no CGI head in {done.stdout[:300]!r}"
    headers = {}
    for line in head.decode("latin-1").split("\r\n"):
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    status = int(re.match(r"\d{3}", headers.pop("status")).group())
    return status, headers, content


def request_env(method: str, uri: str, **extra: str) -> dict[str, str]:
    path, _, query = uri.partition("?")
    # As nginx's stock fastcgi_params send it: SCRIPT_NAME the whole path.
    env = {"GATEWAY_INTERFACE": "CGI/1.1", "SERVER_PROTOCOL": "HTTP/1.1",
           "SERVER_NAME": "localhost", "SERVER_PORT": "80", "REMOTE_ADDR": "127.0.0.1",
           "REQUEST_METHOD": method, "REQUEST_URI": uri, "SCRIPT_NAME": path,
           "QUERY_STRING": query}
    env.update(extra)
    return env


def test_get_with_a_query_string(address):
    status, headers, body = cgi_fcgi(address, request_env("GET", "/a/b?x=1&y=%20z&x=2"))
    assert (status, headers["content-type"]) == (200, "application/json")
    assert int(headers["content-length"]) == len(body)
    seen = json.loads(body)
    assert (seen["REQUEST_METHOD"], seen["SCRIPT_NAME"], seen["PATH_INFO"]) == (
        "GET", "", "/a/b")
    assert seen["QUERY_STRING"] == "x=1&y=%20z&x=2"  # as sent, not decoded
    assert seen["body_length"] == 0 and seen["CONTENT_LENGTH"] is None


@pytest.mark.parametrize("size", [7, 300_000], ids=["small", "over-64k"])
def test_post_with_a_body(address, size):
    # 300 kB reaches the worker in as many STDIN records as cgi-fcgi cuts.
    data = b"a=1&b=2" if size == 7 else random.Random(size).randbytes(size)
    env = request_env("POST", "/form", CONTENT_LENGTH=str(len(data)),
                      CONTENT_TYPE="application/x-www-form-urlencoded")
    status, _, body = cgi_fcgi(address, env, data)
    seen = json.loads(body)
    assert (status, seen["REQUEST_METHOD"], seen["PATH_INFO"]) == (200, "POST", "/form")
    assert (seen["CONTENT_LENGTH"], seen["CONTENT_TYPE"]) == (
        str(size), "application/x-www-form-urlencoded")
    assert (seen["body_length"], seen["body_sha256"]) == (
        size, hashlib.sha256(data).hexdigest())


def test_params_over_64k_from_an_independent_encoder(address):  # K18, K19
    # 100 kB of cookie: PARAMS over several records, a pair across the cut,
    # lengths in libfcgi's encoding rather than ours.
    cookie = "k=" + "c" * 100_000
    status, _, body = cgi_fcgi(address, request_env("GET", "/", HTTP_COOKIE=cookie))
    assert status == 200 and json.loads(body)["HTTP_COOKIE"] == cookie


# -- flup's FastCGI server as a `fastcgi` engine behind corral's front -------------

def test_flup_server_as_a_fastcgi_engine(tmp_path):
    pytest.importorskip("flup", reason="flup is in the test extra: pip install -e '.[test]'")
    from tests.harness import APPS, ServerProcess, request
    app = tmp_path / "flup-app"
    app.mkdir()
    shutil.copy(APPS / "flup_server.py", app)
    (app / "corral.toml").write_text(
        '[app]\nengine = "flup"\nprocesses = 2\n'
        f'[engines.flup]\ncommand = ["{sys.executable}", "flup_server.py"]\n')
    server = ServerProcess(app).wait_ready()
    try:
        status, headers, body, _ = request(
            server.port, b"GET /some/path?x=1 HTTP/1.1\r\nHost: a\r\n\r\n")
        seen = json.loads(body)
        assert status == 200 and (seen["path"], seen["query"]) == ("/some/path", "x=1")
        assert headers["set-cookie*"] == ["a=1", "b=2"]
        assert seen["pid"] in server.worker_pids()
        status, _, body, _ = request(
            server.port, b"POST /f HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello")
        assert status == 200 and json.loads(body)["body"] == "hello"
        # Kept connections: many requests, the same two flup processes.
        pids = {json.loads(request(server.port, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")[2])["pid"]
                for _ in range(10)}
        assert pids <= set(server.worker_pids())
    finally:
        assert server.stop() == 0
