"""Real nginx in front of corral: through the front's FastCGI listener (with
the config `corral nginx-config` prints) and straight to a standalone worker."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from corral import fastcgi
from tests.conftest import cases_config
from tests.harness import (
    APPS,
    ROOT,
    FastCGIClient,
    ServerProcess,
    cgi_params,
    copy_app,
    read_response,
    require_tool,
)


def wait_for_socket(path, proc, timeout: float = 30.0) -> None:
    """Until something accepts on the unix socket `path` (nginx's readiness)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"nginx exited with {proc.returncode}")
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(path))
                return
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {path}") from None
            time.sleep(0.02)


class Nginx:
    """nginx on a unix socket in a folder of its own, around one site file."""

    def __init__(self, folder, site: str) -> None:
        self.folder = folder
        self.sock = folder / "nginx.sock"
        (folder / "site.conf").write_text(site)
        (folder / "nginx.conf").write_text(f"""
daemon off;
{"user root;" if os.geteuid() == 0 else ""}
worker_processes 1;
pid {folder}/nginx.pid;
error_log {folder}/error.log info;
events {{ worker_connections 512; }}
http {{
    access_log {folder}/access.log;
    client_body_temp_path {folder}/body;
    fastcgi_temp_path {folder}/fastcgi;
    proxy_temp_path {folder}/proxy;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
    include /etc/nginx/mime.types;
    include {folder}/site.conf;
}}
""")
        self.proc = subprocess.Popen([require_tool("nginx"), "-c", str(folder / "nginx.conf"),
                                      "-p", str(folder)], stderr=subprocess.PIPE)
        wait_for_socket(self.sock, self.proc)

    def request(self, raw: bytes, timeout: float = 30.0):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(timeout)
            s.connect(str(self.sock))
            s.sendall(raw)
            return read_response(s)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.proc.stderr.close()


def nginx_config(app, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "corral", "nginx-config", str(app), *args],
                            capture_output=True, text=True, check=True, timeout=30,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    return result.stdout


def cases_app(tmp_path, mount: str = "/"):
    app = copy_app(APPS / "cases", tmp_path / "cases")
    (app / "public").mkdir()
    (app / "public" / "hello.txt").write_text("hello static\n")
    config = cases_config(app, processes=2).replace(
        "processes = 2\n", f'processes = 2\nmount = "{mount}"\n')
    (app / "corral.toml").write_text(config)
    return app


@pytest.fixture(scope="module")
def through_listener(tmp_path_factory):
    """nginx -> corral's FastCGI listener -> the cases app's pool."""
    tmp = tmp_path_factory.mktemp("nginx-listener")
    app = cases_app(tmp)
    listener = tmp / "corral.sock"
    server = ServerProcess(app, "--bind", f"fastcgi+unix:{listener}", "--log-level", "DEBUG")
    server.wait_ready()
    site = nginx_config(app, "--listen", f"unix:{tmp / 'nginx.sock'}",
                        "--upstream", f"unix:{listener}")
    nginx = Nginx(tmp, site)
    nginx.server = server
    yield nginx
    nginx.stop()
    server.stop()


class StandaloneWorkers:
    """Two `python -m corral.worker` processes on sockets of their own, as a
    user who supervises workers without corral's pool would run them."""

    def __init__(self, folder, mount: str = "", app: str = "cases:application",
                 count: int = 2) -> None:
        self.procs, self.sockets = [], []
        env = {**os.environ,
               "PYTHONPATH": os.pathsep.join([str(ROOT), str(APPS / "cases"), str(APPS)])}
        for i in range(count):
            path = folder / f"worker{i}.sock"
            proc = subprocess.Popen(
                [sys.executable, "-m", "corral.worker", app,
                 "--bind", f"unix:{path}", "--mount", mount], cwd=APPS / "cases",
                stderr=subprocess.PIPE, text=True, env=env)
            assert "listening on" in proc.stderr.readline()  # its readiness line
            self.procs.append(proc)
            self.sockets.append(path)

    @property
    def pids(self) -> set[int]:
        return {proc.pid for proc in self.procs}

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
            proc.wait(30)
            proc.stderr.close()


@pytest.fixture(scope="module", params=["listener", "direct"])
def nginx_in_front(request, through_listener, tmp_path_factory):
    """Both ways nginx reaches the app: corral's FastCGI listener, or
    straight to standalone workers' sockets."""
    if request.param == "listener":
        yield through_listener
        return
    tmp = tmp_path_factory.mktemp("nginx-direct")
    app = cases_app(tmp)
    workers = StandaloneWorkers(tmp)
    upstreams = [arg for path in workers.sockets for arg in ("--upstream", f"unix:{path}")]
    nginx = Nginx(tmp, nginx_config(app, "--listen", f"unix:{tmp / 'nginx.sock'}", *upstreams))
    nginx.workers = workers
    yield nginx
    nginx.stop()
    workers.stop()


def get(nginx, target: bytes, headers: bytes = b""):
    return nginx.request(b"GET " + target + b" HTTP/1.1\r\nHost: example.org\r\n" + headers
                         + b"Connection: close\r\n\r\n")


def test_get_reaches_the_app_with_a_correct_environ(nginx_in_front):  # K10
    status, _, body, _ = get(nginx_in_front, b"/echo/user/profile?x=1")
    assert status == 200
    seen = json.loads(body)
    assert (seen["SCRIPT_NAME"], seen["PATH_INFO"], seen["QUERY_STRING"]) == (
        "", "/echo/user/profile", "x=1")
    assert seen["REQUEST_METHOD"] == "GET" and seen["HTTP_HOST"] == "example.org"


def test_static_files_are_served_by_nginx(through_listener):
    status, headers, body, _ = get(through_listener, b"/files/hello.txt")
    assert status == 200 and body == b"hello static\n"
    assert headers["server"].startswith("nginx")
    calls = (through_listener.folder / "cases" / "calls.log")
    assert not calls.exists() or "/files/hello.txt" not in calls.read_text()
    assert get(through_listener, b"/corral.toml")[0] == 404
    public = through_listener.folder / "cases" / "public"
    if not (public / "passwd").exists():
        (public / "passwd").symlink_to("/etc/passwd")
    # Refused, as corral's front refuses it (nginx says 403 where corral says 404).
    assert get(through_listener, b"/files/passwd")[0] in (403, 404)


def test_post_of_5_mb_arrives_whole(nginx_in_front):
    data = os.urandom(5 * 1024 * 1024)
    status, _, body, _ = nginx_in_front.request(
        b"POST /digest HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
        % len(data) + data)
    assert status == 200
    assert body == b"%d %s" % (len(data), hashlib.sha256(data).hexdigest().encode())


def test_chunked_upload_gets_a_content_length(nginx_in_front):  # K01 behind nginx
    status, _, body, _ = nginx_in_front.request(
        b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\nConnection: close\r\n\r\n"
        b"5\r\na=1&b\r\n2\r\n=2\r\n0\r\n\r\n")
    assert status == 200
    seen = json.loads(body)
    assert seen["body"] == "a=1&b=2" and seen["CONTENT_LENGTH"] == "7"


def test_10_mb_response_arrives_whole(nginx_in_front):
    status, headers, body, _ = get(nginx_in_front, b"/big?10000000")
    assert status == 200 and len(body) == 10_000_000
    block = bytes(range(256)) * 256
    assert body[:65536] == block and body[-1000:] == block[(10_000_000 % 65536) - 1000:
                                                            10_000_000 % 65536]


def test_two_cookies_survive(nginx_in_front):  # K06 behind nginx
    _, headers, _, _ = get(nginx_in_front, b"/cookies")
    assert headers["set-cookie*"] == ["a=1; Path=/", "b=2; Path=/"]


def test_one_upstream_connection_serves_many_requests(through_listener):
    server = through_listener.server
    pattern = r"FastCGI listener: a web server connected"
    before = len([line for line in server.lines if "a web server connected" in line])
    for _ in range(20):
        assert get(through_listener, b"/pid")[0] == 200
    server.wait_for(pattern)
    after = len([line for line in server.lines if "a web server connected" in line])
    # nginx has one worker process: with keepalive it reuses its connection
    # (at most one more if a request raced the previous one's release).
    assert after - before <= 1, server.log


def test_client_gone_mid_request_frees_the_worker(through_listener):
    server = through_listener.server
    seen = len([line for line in server.lines if "SLOW STARTED" in line])
    gone = len([line for line in server.lines if "client gone: asking worker" in line])
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(through_listener.sock))
        s.sendall(b"GET /slow-logged?1 HTTP/1.1\r\nHost: a\r\n\r\n")
        server.wait_for("SLOW STARTED", count=seen + 1)
    # nginx closes its upstream connection; corral asks the worker to stop.
    line = server.wait_for(r"client gone: asking worker pid \d+ to stop", count=gone + 1)
    pid = int(line.split("worker pid ")[1].split()[0])
    ended = f"worker pid {pid} ended an abandoned request; free again"
    before = [seen for seen in server.lines[:server.lines.index(line)] if ended in seen]
    server.wait_for(ended, count=len(before) + 1)
    # Free again, and the idle worker released last is the next one used.
    assert json.loads(get(through_listener, b"/echo")[2])["pid"] == pid


def test_app_mounted_under_a_prefix(tmp_path):  # K10, sub-path
    app = cases_app(tmp_path, mount="/sub")
    listener = tmp_path / "corral.sock"
    server = ServerProcess(app, "--bind", f"fastcgi+unix:{listener}").wait_ready()
    nginx = Nginx(tmp_path, nginx_config(app, "--listen", f"unix:{tmp_path / 'nginx.sock'}",
                                         "--upstream", f"unix:{listener}"))
    try:
        status, _, body, _ = get(nginx, b"/sub/echo/x?y=2")
        assert status == 200
        seen = json.loads(body)
        assert (seen["SCRIPT_NAME"], seen["PATH_INFO"], seen["QUERY_STRING"]) == (
            "/sub", "/echo/x", "y=2")
        assert get(nginx, b"/subway")[0] == 404
    finally:
        nginx.stop()
        server.stop()


def test_straight_to_workers_mounted_under_a_prefix(tmp_path):  # K10, sub-path
    workers = StandaloneWorkers(tmp_path, mount="/sub")
    app = cases_app(tmp_path, mount="/sub")
    upstreams = [arg for path in workers.sockets for arg in ("--upstream", f"unix:{path}")]
    nginx = Nginx(tmp_path, nginx_config(app, "--listen", f"unix:{tmp_path / 'nginx.sock'}",
                                         *upstreams))
    try:
        seen = json.loads(get(nginx, b"/sub/echo/x?y=2")[2])
        assert (seen["SCRIPT_NAME"], seen["PATH_INFO"], seen["QUERY_STRING"]) == (
            "/sub", "/echo/x", "y=2")
        assert seen["pid"] in workers.pids
        assert get(nginx, b"/subway")[0] == 404
    finally:
        nginx.stop()
        workers.stop()


def test_nginx_straight_to_a_standalone_worker(tmp_path):  # K10, K16
    worker_sock = tmp_path / "worker.sock"
    worker = subprocess.Popen(
        [sys.executable, "-m", "corral.worker", "cases:application",
         "--bind", f"unix:{worker_sock}"], cwd=APPS / "cases", stderr=subprocess.PIPE,
        text=True, env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{APPS / 'cases'}"})
    try:
        assert "listening on" in worker.stderr.readline()
        app = cases_app(tmp_path)
        nginx = Nginx(tmp_path, nginx_config(app, "--listen", f"unix:{tmp_path / 'nginx.sock'}",
                                             "--upstream", f"unix:{worker_sock}"))
        try:
            pids = set()
            for i in range(5):  # one kept connection, many requests
                status, _, body, _ = get(nginx, b"/echo/p?i=%d" % i)
                assert status == 200
                seen = json.loads(body)
                assert (seen["SCRIPT_NAME"], seen["PATH_INFO"], seen["QUERY_STRING"]) == (
                    "", "/echo/p", f"i={i}")
                pids.add(seen["pid"])
            assert pids == {worker.pid}
            data = os.urandom(5 * 1024 * 1024)
            status, _, body, _ = nginx.request(
                b"POST /digest HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n"
                b"Connection: close\r\n\r\n" % len(data) + data)
            assert body == b"%d %s" % (len(data), hashlib.sha256(data).hexdigest().encode())
        finally:
            nginx.stop()
    finally:
        worker.terminate()
        worker.wait(30)
        worker.stderr.close()


# -- the listener's own side of the protocol, with a raw FastCGI client ----------

@pytest.fixture(scope="module")
def listener_over_tcp(tmp_path_factory):
    """The cases app with a FastCGI listener on TCP (port 0) and a small max_body."""
    tmp = tmp_path_factory.mktemp("listener-tcp")
    app = cases_app(tmp)
    with open(app / "corral.toml", "a") as f:
        f.write("[server]\nmax_body = 100000\n")
    server = ServerProcess(app, "--bind", "fastcgi+tcp:127.0.0.1:0").wait_ready()
    line = server.wait_for(r"listening on .*fastcgi\+tcp:")
    port = int(line.rsplit("fastcgi+tcp:", 1)[1].split(",")[0].rsplit(":", 1)[1])
    server.fastcgi = ("127.0.0.1", port)
    yield server
    server.stop()


def test_listener_over_tcp_serves_kept_connections(listener_over_tcp):  # K16
    client = FastCGIClient(listener_over_tcp.fastcgi)
    for i in range(3):
        stdout, _, end = client.request(cgi_params("GET", f"/echo?n={i}"), request_id=1)
        assert end.protocol_status == fastcgi.ProtocolStatus.REQUEST_COMPLETE
        head, _, body = stdout.partition(b"\r\n\r\n")
        assert head.startswith(b"Status: 200 OK")
        assert json.loads(body)["QUERY_STRING"] == f"n={i}"
    client.send(fastcgi.ServerConnection.get_values([b"FCGI_MPXS_CONNS"]))
    values = next(e for e in client.events() if isinstance(e, fastcgi.ValuesResult))
    assert values.values == {b"FCGI_MPXS_CONNS": b"0"}
    assert client.request(cgi_params("GET", "/pid"))[2].app_status == 0  # still open
    client.close()


def test_listener_refuses_a_body_over_max_body_with_413(listener_over_tcp):
    client = FastCGIClient(listener_over_tcp.fastcgi)
    body = b"x" * 200_000
    stdout, _, _ = client.request(cgi_params("POST", "/digest", body), body)
    assert stdout.startswith(b"Status: 413 ")
    client.close()


def test_listener_drops_a_peer_that_breaks_the_protocol(listener_over_tcp):
    with socket.create_connection(listener_over_tcp.fastcgi, timeout=10) as s:
        s.sendall(b"\x09" + b"\x00" * 15)  # version 9: not FastCGI 1
        assert s.recv(100) == b""  # closed
    listener_over_tcp.wait_for(r"the web server broke the protocol")
    client = FastCGIClient(listener_over_tcp.fastcgi)
    assert client.request(cgi_params("GET", "/pid"))[0].startswith(b"Status: 200")
    client.close()


def test_big_cookie_through_nginx_reaches_the_app(nginx_in_front):  # K19
    cookie = "k=" + "c" * 6 * 1024
    status, _, body, _ = get(nginx_in_front, b"/echo", f"Cookie: {cookie}\r\n".encode())
    assert status == 200 and json.loads(body)["HTTP_COOKIE"] == cookie


def socket_inodes(pid: int) -> set[str]:
    """The sockets process `pid` holds open, as "socket:[inode]" names."""
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:"):
            found.add(target)
    return found


def test_nginx_keeps_its_connections_to_standalone_workers(tmp_path):  # K16
    workers = StandaloneWorkers(tmp_path)
    app = cases_app(tmp_path)
    upstreams = [arg for path in workers.sockets for arg in ("--upstream", f"unix:{path}")]
    nginx = Nginx(tmp_path, nginx_config(app, "--listen", f"unix:{tmp_path / 'nginx.sock'}",
                                         *upstreams))
    try:
        for _ in range(4):  # each worker has been reached at least once
            assert get(nginx, b"/pid")[0] == 200
        before = {pid: socket_inodes(pid) for pid in workers.pids}
        # Each holds its listening socket and at least one kept connection.
        assert all(len(sockets) >= 2 for sockets in before.values()), before
        for _ in range(20):
            assert get(nginx, b"/pid")[0] == 200
        after = {pid: socket_inodes(pid) for pid in workers.pids}
        # The same sockets: nginx sent the 20 requests on the connections it kept.
        assert after == before
    finally:
        nginx.stop()
        workers.stop()


def test_client_gone_frees_a_standalone_worker(tmp_path):  # K17, straight to the worker
    workers = StandaloneWorkers(tmp_path, app="drip:application", count=1)
    app = cases_app(tmp_path)
    nginx = Nginx(tmp_path, nginx_config(app, "--listen", f"unix:{tmp_path / 'nginx.sock'}",
                                         "--upstream", f"unix:{workers.sockets[0]}"))
    mark = tmp_path / "closed.txt"
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(30)
            s.connect(str(nginx.sock))
            s.sendall(b"GET /drip?count=100&delay=0.1&mark=%s HTTP/1.1\r\nHost: a\r\n\r\n"
                      % str(mark).encode())
            assert b"chunk 0" in s.recv(65536)  # the response has begun; then we leave
        # The whole response would take 10 s; the worker stops long before,
        # calls close() (which leaves the mark) and serves the next request.
        status, _, body, _ = get(nginx, b"/pid")
        assert status == 200 and int(body) == workers.procs[0].pid
        made = int(mark.read_text().split()[2])
        assert made < 60, mark.read_text()
    finally:
        nginx.stop()
        workers.stop()
