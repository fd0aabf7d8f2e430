"""Engines and transports: [engines.NAME] declarations and their errors, real
php-cgi supervised by corral behind its HTTP front, the python engine over
TCP, and an engine at an address that corral connects to but does not run."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

import pytest

from corral.config import ConfigError, load
from corral.pool import find_script
from tests.harness import APPS, ROOT, ServerProcess, alive, copy_app, request

PHP_APP = APPS / "php"
# Outside Linux's default ephemeral range (32768-60999), so the ports corral
# picks here rarely meet a client socket; the pool skips ports in use anyway.
TEST_PORTS = "23100-23199"


@pytest.fixture(scope="session")
def php_cgi() -> str:
    """php-cgi, or a skip naming it; on CI (CI set) a missing one fails."""
    path = shutil.which("php-cgi")
    if path is None:
        message = "php-cgi is not installed (apt-get install -y php-cgi)"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI must run the engine tests")
        pytest.skip(message)
    return path


def php_app(tmp_path: Path, processes: int = 2, engine: str = "") -> Path:
    """A copy of the PHP test app; `engine` replaces its [engines.php] table."""
    app = copy_app(PHP_APP, tmp_path / "php")
    text = (app / "corral.toml").read_text().replace("processes = 2",
                                                     f"processes = {processes}")
    if engine:
        text = text.split("[engines.php]")[0] + "[engines.php]\n" + engine
    (app / "corral.toml").write_text(text)
    return app


@pytest.fixture(scope="module")
def php_server(php_cgi, tmp_path_factory):
    server = ServerProcess(php_app(tmp_path_factory.mktemp("php"))).wait_ready()
    yield server
    server.stop()


def get(port: int, target: str) -> tuple[int, dict, bytes, bytes]:
    return request(port, f"GET {target} HTTP/1.1\r\nHost: a\r\n\r\n".encode(), timeout=30)


def post_form(port: int, target: str, fields: dict) -> tuple[int, dict, bytes, bytes]:
    body = urlencode(fields).encode()
    return request(port, f"POST {target} HTTP/1.1\r\nHost: a\r\n"
                   "Content-Type: application/x-www-form-urlencoded\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n".encode() + body, timeout=30)


def wait_gone(pids, timeout: float = 10.0) -> None:
    """Processes that are not our children end: watch /proc for it."""
    deadline = time.monotonic() + timeout
    while any(alive(pid) for pid in pids):
        assert time.monotonic() < deadline, f"still running: {[p for p in pids if alive(p)]}"
        time.sleep(0.05)


def fd0_listening_port(pid: int) -> int | None:
    """The TCP port that process `pid` listens on with file descriptor 0,
    from /proc: proof of what the worker was really given."""
    link = os.readlink(f"/proc/{pid}/fd/0")
    inode = re.fullmatch(r"socket:\[(\d+)\]", link)
    if inode is None:
        return None
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[9] == inode.group(1) and fields[3] == "0A":  # 0A: LISTEN
                return int(fields[1].rsplit(":", 1)[1], 16)
    return None


# -- declarations and their errors ------------------------------------------

def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "corral.toml").write_text(text)
    (tmp_path / "public").mkdir(exist_ok=True)
    return tmp_path


PHP = '[app]\nengine = "php"\n[engines.php]\n'


@pytest.mark.parametrize("text, key, words", [
    ('[app]\nengine = "php"\n', "[app] engine", "no engine named 'php'"),
    (PHP + 'command = ["no-such-fastcgi-program"]\n', "[engines.php] command",
     "not found on PATH"),
    (PHP + 'command = ["./bin/missing"]\n', "[engines.php] command",
     "is not an executable file"),
    (PHP + 'command = ["sh"]\naddress = "127.0.0.1:9000"\n', "[engines.php] address",
     "both command and address"),
    (PHP + 'transport = "tcp"\n', "[engines.php]", "neither command nor address"),
    (PHP + 'command = ["sh"]\ntransport = "tcp"\nports = "9199-9100"\n',
     "[engines.php] ports", "not a port range"),
    (PHP + 'command = ["sh"]\ntransport = "tcp"\nports = "0-10"\n',
     "[engines.php] ports", "not a port range"),
    (PHP + 'command = ["sh"]\ntransport = "tcp"\nports = "nine"\n',
     "[engines.php] ports", "not a port range"),
    (PHP + 'command = ["sh"]\ntransport = "tcp"\nports = "9100-9100"\n',
     "[engines.php] ports", "1 ports for 2 workers"),
    (PHP + 'command = ["sh"]\nports = "9100-9199"\n', "[engines.php] ports",
     "only the tcp transport"),
    (PHP + 'command = ["sh", "-b", "127.0.0.1:{port}"]\n', "[engines.php] command",
     "{port} placeholder but the transport is unix"),
    (PHP + 'command = ["sh", "{port}"]\ntransport = "tcp"\n', "[engines.php] ports",
     "no ports are given"),
    (PHP + 'command = ["sh"]\ntransport = "udp"\n', "[engines.php] transport",
     'one of "unix", "tcp"'),
    (PHP + 'command = "php-cgi"\n', "[engines.php] command", "list of strings"),
    (PHP + 'command = ["sh"]\nenv = { A = 1 }\n', "[engines.php] env", "table of strings"),
    (PHP + 'command = ["sh"]\nchildren = 4\n', "[engines.php] children", "unknown key"),
    (PHP + 'address = "127.0.0.1:9000"\nenv = { A = "1" }\n', "[engines.php] env",
     "does not apply to an engine with an address"),
    (PHP + 'address = "nowhere"\n', "[engines.php] address", "HOST:PORT"),
    ('[app]\nwsgi = "app:application"\n[engines.python]\ncommand = ["sh"]\n',
     "[engines.python]", "built-in engine"),
    ('[app]\nwsgi = "app:application"\n[engines]\ncommand = ["sh"]\n',
     "[engines] command", "is not a table"),
    (PHP + 'command = ["sh"]\n[app]\n', None, "not valid TOML"),
    ('[app]\nengine = "php"\nwsgi = "app:application"\n[engines.php]\ncommand = ["sh"]\n',
     "[app] wsgi", "does not apply to the engine 'php'"),
    ('[app]\nengine = "php"\ntransport = "tcp"\n[engines.php]\ncommand = ["sh"]\n',
     "[app] transport", "does not apply"),
    ('[app]\nwsgi = "app:application"\nroot = "public"\n', "[app] root", "does not apply"),
    ('[app]\nwsgi = "app:application"\ntransport = "pipe"\n', "[app] transport",
     'one of "unix", "tcp"'),
    ('[app]\nengine = "php"\nroot = "nope"\n[engines.php]\ncommand = ["sh"]\n',
     "[app] root", "does not exist"),
    ('[app]\nengine = "php"\nindex = "../x.php"\n[engines.php]\ncommand = ["sh"]\n',
     "[app] index", "not a file name"),
])
def test_engine_errors_name_file_key_and_fix(tmp_path, text, key, words):
    write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(tmp_path)
    message = str(info.value)
    assert str(tmp_path / "corral.toml") in message
    if key:
        assert f": {key}: " in message
    assert words in message
    assert "Fix:" in message


def test_engine_declarations_are_read(tmp_path):
    write(tmp_path, '[app]\nengine = "php"\nprocesses = 3\nroot = "public"\n'
          '[engines.php]\ncommand = ["sh", "-c", "x {port}"]\ntransport = "tcp"\n'
          'ports = "9100-9102"\nenv = { PHP_FCGI_CHILDREN = "0" }\n'
          '[engines.ext]\naddress = "unix:/run/app.sock"\n')
    config = load(tmp_path)
    engine = config.engine
    assert engine.name == "php" and not engine.builtin
    assert engine.command == (shutil.which("sh"), "-c", "x {port}")
    assert engine.transport == "tcp" and engine.ports == (9100, 9102)
    assert engine.listens_itself and engine.env == {"PHP_FCGI_CHILDREN": "0"}
    assert config.docroot == tmp_path / "public" and config.index == "index.php"
    assert config.wsgi == ""

    (tmp_path / "corral.toml").write_text('[app]\nengine = "ext"\n'
                                          '[engines.ext]\naddress = "127.0.0.1:9000"\n')
    engine = load(tmp_path).engine
    assert (engine.address.host, engine.address.port, engine.transport) == (
        "127.0.0.1", 9000, "tcp")

    (tmp_path / "corral.toml").write_text('[app]\nwsgi = "app:application"\n')
    engine = load(tmp_path).engine
    assert engine.builtin and engine.transport == "unix" and engine.command is None


def test_find_script_maps_paths_like_a_web_server(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "empty").mkdir()
    for name in ("index.php", "info.php", "sub/index.php", "notes.txt"):
        (tmp_path / name).write_text("<?php\n")
    root = os.fsencode(tmp_path)
    cases = {
        b"": (b"/index.php", b""),
        b"/": (b"/index.php", b""),
        b"/info.php": (b"/info.php", b""),
        b"/info.php/a/b": (b"/info.php", b"/a/b"),
        b"/sub/": (b"/sub/index.php", b""),
        b"/sub": (b"/sub/index.php", b""),
        b"/sub/index.php/x": (b"/sub/index.php", b"/x"),
        b"/empty/": (b"/index.php", b"/empty/"),  # no index there: the front controller
        b"/users/7": (b"/index.php", b"/users/7"),
        b"/notes.txt": (b"/index.php", b"/notes.txt"),  # never run as PHP
        b"/sub/../info.php": (b"/index.php", b"/sub/../info.php"),
    }
    for rest, expected in cases.items():
        assert find_script(root, b"index.php", rest) == expected, rest


# -- php-cgi behind the front -----------------------------------------------

def test_php_page_with_get_parameters(php_server):
    status, headers, body, _ = get(php_server.port, "/index.php?name=corral&n=2&s=a%20b")
    assert status == 200 and headers["content-type"] == "application/json"
    seen = json.loads(body)
    assert seen["get"] == {"name": "corral", "n": "2", "s": "a b"}
    assert seen["script_name"] == "/index.php"
    public = php_server.app_dir / "public"
    assert seen["script_filename"] == str(public / "index.php")
    assert seen["document_root"] == str(public)


def test_php_front_controller_and_folder_index(php_server):
    seen = json.loads(get(php_server.port, "/users/7?tab=x")[2])
    assert (seen["script_name"], seen["path_info"]) == ("/index.php", "/users/7")
    assert seen["get"] == {"tab": "x"} and seen["request_uri"] == "/users/7?tab=x"
    assert get(php_server.port, "/sub/")[2] == b"sub index /sub/index.php\n"
    # A file that is not a script is never handed to php-cgi to run.
    seen = json.loads(get(php_server.port, "/notes.txt")[2])
    assert seen["path_info"] == "/notes.txt"


def test_php_post_form_fields_are_echoed(php_server):
    fields = {"name": "corral", "text": "caf\u00e9 & cr\u00e8me", "empty": ""}
    status, _, body, _ = post_form(php_server.port, "/form.php", fields)
    assert status == 200
    seen = json.loads(body)
    assert seen["method"] == "POST"
    assert seen["content_type"] == "application/x-www-form-urlencoded"
    assert seen["post"] == fields


def test_php_large_response_arrives_whole(php_server):
    status, headers, body, _ = get(php_server.port, "/big.php?mb=5")
    assert status == 200
    expected = b"".join(f"{i:08d}".encode().ljust(1024, b".") for i in range(5 * 1024))
    assert len(body) == 5 * 1024 * 1024
    assert hashlib.sha256(body).digest() == hashlib.sha256(expected).digest()


def test_php_two_set_cookie_headers_stay_separate(php_server):
    status, headers, body, raw = get(php_server.port, "/cookies.php")
    assert status == 200 and body == b"two cookies\n"
    assert headers["set-cookie*"] == ["first=1; path=/", "second=2; path=/; HttpOnly"]
    assert raw.count(b"\r\nSet-Cookie: ") == 2


def test_killed_php_cgi_is_replaced(php_cgi, tmp_path):
    server = ServerProcess(php_app(tmp_path, processes=1)).wait_ready()
    try:
        first = json.loads(get(server.port, "/")[2])["pid"]
        assert server.worker_pids() == [first]
        os.kill(first, signal.SIGKILL)
        server.wait_for(rf"worker pid {first} .*killed by SIGKILL")
        line = server.wait_for(r"spawned worker pid \d+", count=2)
        new = int(re.search(r"spawned worker pid (\d+)", line).group(1))
        server.wait_for(rf"worker pid {new} ready")
        for _ in range(3):
            status, _, body, _ = get(server.port, "/index.php?after=kill")
            assert status == 200 and json.loads(body)["pid"] == new
    finally:
        assert server.stop() == 0
    wait_gone([first, new])


def test_php_cgi_recycling_itself_loses_no_request(php_cgi, tmp_path):
    """php-cgi exits after PHP_FCGI_MAX_REQUESTS; the next request may already
    be on its way to it, and must be served by the replacement."""
    engine = ('command = ["php-cgi"]\n'
              'env = { PHP_FCGI_CHILDREN = "0", PHP_FCGI_MAX_REQUESTS = "2" }\n')
    server = ServerProcess(php_app(tmp_path, processes=1, engine=engine)).wait_ready()
    try:
        pids = []
        for i in range(7):
            status, _, body, _ = get(server.port, f"/index.php?i={i}")
            assert status == 200, body
            pids.append(json.loads(body)["pid"])
        assert len(set(pids)) == 4  # two requests each
        assert "exited (exit status 0)" in server.log and "unexpectedly" not in server.log
    finally:
        assert server.stop() == 0


def test_php_cgi_stops_with_corral(php_cgi, tmp_path):
    """SIGTERM: php-cgi waits on its kept connection, so the pool closes the
    idle links first and it exits without being killed.  SIGKILL of the
    supervisor: the kernel ends php-cgi (parent-death signal)."""
    server = ServerProcess(php_app(tmp_path)).wait_ready()
    workers = server.worker_pids()
    assert len(workers) == 2 and get(server.port, "/")[0] == 200
    assert server.stop() == 0
    assert "did not stop" not in server.log
    wait_gone(workers)

    server = ServerProcess(php_app(tmp_path / "again")).wait_ready()
    workers = server.worker_pids()
    server.kill()
    wait_gone(workers)


@pytest.mark.parametrize("command", [
    '["php-cgi"]',  # a TCP listening socket on fd 0
    '["php-cgi", "-b", "127.0.0.1:{port}"]',  # php-cgi binds the port it is given
])
def test_php_over_tcp_from_a_port_range(php_cgi, tmp_path, command):
    engine = (f'command = {command}\ntransport = "tcp"\nports = "{TEST_PORTS}"\n'
              'env = { PHP_FCGI_CHILDREN = "0", PHP_FCGI_MAX_REQUESTS = "0" }\n')
    server = ServerProcess(php_app(tmp_path, engine=engine)).wait_ready()
    try:
        low, high = map(int, TEST_PORTS.split("-"))
        ports = [int(m) for m in re.findall(r"spawned worker pid \d+ .* on 127\.0\.0\.1:(\d+)",
                                            server.log)]
        assert len(set(ports)) == 2 and all(low <= p <= high for p in ports)
        if "{port}" not in command:
            assert sorted(fd0_listening_port(pid) for pid in server.worker_pids()) == sorted(ports)
        seen = json.loads(get(server.port, "/index.php?over=tcp")[2])
        assert seen["get"] == {"over": "tcp"}
        status, _, body, _ = post_form(server.port, "/form.php", {"a": "1"})
        assert status == 200 and json.loads(body)["post"] == {"a": "1"}
    finally:
        assert server.stop() == 0


# -- the python engine over tcp ---------------------------------------------

def cases_app(tmp_path: Path, app_keys: str, extra: str = "") -> Path:
    app = copy_app(APPS / "cases", tmp_path / "cases")
    (app / "corral.toml").write_text(f'[app]\n{app_keys}\n[env]\nPYTHONPATH = "."\n' + extra)
    return app


def test_python_engine_over_tcp(tmp_path):
    app = cases_app(tmp_path, 'wsgi = "cases:application"\nprocesses = 2\ntransport = "tcp"')
    server = ServerProcess(app).wait_ready()
    try:
        workers = server.worker_pids()
        ports = [fd0_listening_port(pid) for pid in workers]
        assert len(workers) == 2 and all(ports) and len(set(ports)) == 2
        status, _, body, _ = get(server.port, "/echo?x=1")
        seen = json.loads(body)
        assert status == 200 and seen["QUERY_STRING"] == "x=1" and seen["pid"] in workers
        status, _, body, _ = request(server.port, b"POST /echo HTTP/1.1\r\nHost: a\r\n"
                                     b"Content-Length: 11\r\n\r\nhello world")
        assert status == 200 and json.loads(body)["body"] == "hello world"
    finally:
        assert server.stop() == 0


# -- an engine at an address ------------------------------------------------

class ExternalWorker:
    """`python -m corral.worker` started by the test, not by corral: the
    FastCGI server that an address engine points at."""

    def __init__(self, bind: str = "127.0.0.1:0") -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(APPS / "cases")]))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "corral.worker", "cases:application", "--bind", bind],
            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env, text=True)
        # The worker says where it listens, with the real port, once loaded.
        for line in self.proc.stderr:
            if "listening on " in line:
                self.port = int(line.rsplit(":", 1)[1])
                break
        else:
            raise RuntimeError(f"worker exited ({self.proc.wait()}) before listening")
        self._drain = threading.Thread(target=self.proc.stderr.read, daemon=True)
        self._drain.start()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._drain.join(5)
        self.proc.stderr.close()


def test_address_engine_connects_and_reconnects(tmp_path):
    external = ExternalWorker()
    address = f"127.0.0.1:{external.port}"
    app = cases_app(tmp_path, 'engine = "ext"\nprocesses = 2\nqueue_timeout = 1',
                    f'[engines.ext]\naddress = "{address}"\n')
    server = ServerProcess(app).wait_ready()
    try:
        # Two links, nothing spawned.
        for slot in (0, 1):
            server.wait_for(rf"link {slot} connected to the FastCGI server at {address}")
        assert server.worker_pids() == []
        status, _, body, _ = get(server.port, "/echo?via=address")
        assert status == 200 and json.loads(body)["pid"] == external.proc.pid
        status, _, body, _ = request(server.port, b"POST /echo HTTP/1.1\r\nHost: a\r\n"
                                     b"Content-Length: 3\r\n\r\nabc")
        assert status == 200 and json.loads(body)["body"] == "abc"

        # The server goes away: requests wait their queue time and get 503,
        # and corral keeps trying to reconnect...
        external.stop()
        server.wait_for(rf"cannot connect link \d to the FastCGI server at {address}")
        assert get(server.port, "/echo")[0] == 503
        # ... until it is back on the same address.
        external = ExternalWorker(address)
        for slot in (0, 1):
            server.wait_for(rf"link {slot} connected to the FastCGI server at {address} "
                            r"after \d+ failed tries")
        status, _, body, _ = get(server.port, "/echo?back=1")
        assert status == 200 and json.loads(body)["pid"] == external.proc.pid
    finally:
        assert server.stop() == 0
        external.stop()
