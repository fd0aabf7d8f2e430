"""corral under systemd: the units `corral systemd` prints (checked by
systemd-analyze), listening sockets passed the way systemd passes them, and
the notify protocol's READY=1 and STOPPING=1 on a datagram socket we bind.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.conftest import cases_config
from tests.harness import (
    APPS,
    ROOT,
    FastCGIClient,
    ServerProcess,
    cgi_params,
    copy_app,
    request,
    require_tool,
)
from tests.test_new import CorralProcess

# What systemd does between fork and exec, as a program: the sockets given as
# descriptor numbers in argv[1] move to 3, 4, ...; LISTEN_PID is the pid that
# then execs corral.  Moved through descriptors >= 10 first, so that one
# already at 3 or 4 is not overwritten before it is moved.
LISTEN_WRAPPER = """
import fcntl, os, sys
given = [int(fd) for fd in sys.argv[1].split(",")]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in given]
for fd in given:
    os.close(fd)
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
    os.close(fd)
os.environ["LISTEN_FDS"] = str(len(given))
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


def corral(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "corral", *args], capture_output=True,
                          text=True, env=env, timeout=60, **kwargs)


def cases_app(tmp_path: Path, server: str = "") -> Path:
    app = copy_app(APPS / "cases", tmp_path / "cases")
    (app / "public").mkdir()
    (app / "public" / "hello.txt").write_text("hello static\n")
    (app / "corral.toml").write_text(cases_config(app, server=server))
    return app


def environ_of(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        pairs = [item.partition(b"=") for item in f.read().split(b"\0") if item]
    return {k.decode(): v.decode("latin-1") for k, _, v in pairs}


# -- the units -------------------------------------------------------------------

def test_units_pass_systemd_analyze_verify(tmp_path):
    """The service and both socket units (HTTP and FastCGI binds) verify
    cleanly, with the settings a production service needs."""
    analyze = require_tool("systemd-analyze")
    app = cases_app(tmp_path, server='bind = ["127.0.0.1:8123", '
                    '"fastcgi+unix:/run/corral/cases.sock"]\ngraceful_timeout = 40')
    out = tmp_path / "units"
    out.mkdir()
    user = getpass.getuser()
    done = corral("systemd", str(app), "--user", user, "--socket", "--write", str(out))
    assert done.returncode == 0, done.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == ["corral-cases-fastcgi.socket", "corral-cases.service",
                     "corral-cases.socket"]
    service = (out / "corral-cases.service").read_text()
    assert "ExecReload=/bin/kill -HUP $MAINPID" in service  # reload: a new generation
    exec_start = re.search(r"^ExecStart=(\S+) serve (\S+)$", service, re.M)
    assert exec_start and Path(exec_start.group(1)).is_absolute()
    assert os.access(exec_start.group(1), os.X_OK) and exec_start.group(2) == str(app)
    for line in ("Type=notify", f"User={user}", f"WorkingDirectory={app}",
                 "Restart=on-failure", "KillSignal=SIGTERM", "KillMode=mixed",
                 "Requires=corral-cases.socket corral-cases-fastcgi.socket",
                 "Sockets=corral-cases.socket corral-cases-fastcgi.socket"):
        assert f"\n{line}\n" in service, line
    stop = int(re.search(r"^TimeoutStopSec=(\d+)$", service, re.M).group(1))
    assert stop > 40
    http = (out / "corral-cases.socket").read_text()
    assert "ListenStream=127.0.0.1:8123\n" in http and "FileDescriptorName=http\n" in http
    fcgi = (out / "corral-cases-fastcgi.socket").read_text()
    assert "ListenStream=/run/corral/cases.sock\n" in fcgi
    assert "FileDescriptorName=fastcgi\n" in fcgi and "Service=corral-cases.service\n" in fcgi

    files = [str(out / name) for name in names]
    verify = subprocess.run([analyze, "verify", *files], capture_output=True, text=True,
                            timeout=60)
    # verify exits 0 even for lines it ignores, so what it says about our
    # files must be nothing at all.
    ours = [line for line in verify.stderr.splitlines() if "corral-cases" in line]
    assert verify.returncode == 0 and not ours, verify.stderr


def test_unit_is_printed_without_write(tmp_path):
    """Without --socket, corral binds itself: a unix socket under /run/NAME/
    gets that folder made by systemd for the service's user."""
    app = cases_app(tmp_path, server='bind = "fastcgi+unix:/run/corral/cases.sock"')
    done = corral("systemd", str(app), "--user", "nobody")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("# corral-cases.service")
    assert "\nUser=nobody\n" in done.stdout and "[Socket]" not in done.stdout
    assert "\nRuntimeDirectory=corral\nRuntimeDirectoryPreserve=yes\n" in done.stdout


@pytest.mark.parametrize("bind, why", [("localhost:8000", "needs an IP address"),
                                       ("127.0.0.1:0", "needs a fixed port")])
def test_socket_unit_refuses_what_systemd_cannot_listen_on(tmp_path, bind, why):
    app = cases_app(tmp_path, server=f'bind = "{bind}"')
    done = corral("systemd", str(app), "--socket")
    assert done.returncode == 2 and why in done.stderr and "[server] bind" in done.stderr


# -- sockets passed by systemd ---------------------------------------------------

def start_with_sockets(app: Path, sockets: list[socket.socket], names: str,
                       env: dict | None = None) -> CorralProcess:
    fds = [s.fileno() for s in sockets]
    command = [sys.executable, "-c", LISTEN_WRAPPER, ",".join(map(str, fds)),
               "-m", "corral", "serve", str(app)]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "LISTEN_FDNAMES": names, **(env or {})}
    return CorralProcess(command, full_env, pass_fds=tuple(fds))


def test_serves_on_sockets_passed_by_systemd(tmp_path):
    """An HTTP socket on TCP and a FastCGI one on a unix path, passed as
    fds 3 and 4: corral serves both and binds nothing of its own (its
    config's 127.0.0.1:8000 stays unused); the workers do not inherit the
    variables; the unix socket's file is systemd's and stays after stop."""
    app = cases_app(tmp_path)
    http = socket.socket()
    http.bind(("127.0.0.1", 0))
    http.listen(16)
    path = str(tmp_path / "fcgi.sock")
    fcgi = socket.socket(socket.AF_UNIX)
    fcgi.bind(path)
    fcgi.listen(16)
    port = http.getsockname()[1]
    with http, fcgi:
        server = start_with_sockets(app, [http, fcgi], "http:fastcgi").wait_ready()
        try:
            line = server.wait_for(r"listening on ")
            assert line.endswith(f"listening on http://127.0.0.1:{port}, fastcgi+unix:{path}")
            assert server.port == port and ":8000" not in server.log
            status, _, body, _ = request(port, b"GET /echo HTTP/1.1\r\nHost: a\r\n\r\n")
            assert status == 200 and json.loads(body)["PATH_INFO"] == "/echo"
            client = FastCGIClient(path)
            try:
                stdout, _, end = client.request(cgi_params("GET", "/echo?via=fcgi"))
            finally:
                client.close()
            assert stdout.startswith(b"Status: 200") and b'"QUERY_STRING": "via=fcgi"' in stdout
            for pid in server.worker_pids():
                seen = environ_of(pid)
                assert not {"LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"} & set(seen), pid
        finally:
            assert server.stop() == 0
        assert os.path.exists(path)
        # Our copies of the sockets still listen: corral closed only its own.
        assert http.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)


def test_passed_socket_that_does_not_listen_is_refused(tmp_path):
    app = cases_app(tmp_path)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        server = start_with_sockets(app, [udp], "http")
        assert server.proc.wait(60) == 2
        server.wait_for(r"not a listening stream socket; use ListenStream=")
        server.stop()


# -- the notify protocol -----------------------------------------------------------

@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notify_ready_then_stopping(tmp_path, abstract):
    """READY=1 comes once corral logs it is ready, STOPPING=1 when SIGTERM
    starts the graceful stop; the workers do not see NOTIFY_SOCKET."""
    app = cases_app(tmp_path)
    if abstract:
        name = f"corral-test-{uuid.uuid4().hex}"
        address, variable = "\0" + name, "@" + name
    else:
        address = variable = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(address)
        notify.settimeout(60)
        server = ServerProcess(app, env={"NOTIFY_SOCKET": variable})
        try:
            message = notify.recv(4096).decode()
            assert "READY=1" in message.splitlines(), message
            # Ready means serving: a request sent at once is answered by the app.
            port = int(re.search(r"STATUS=serving at http://127\.0\.0\.1:(\d+)", message)[1])
            status, _, body, _ = request(port, b"GET /echo HTTP/1.1\r\nHost: a\r\n\r\n")
            assert status == 200 and json.loads(body)["PATH_INFO"] == "/echo"
            server.wait_ready()
            for pid in server.worker_pids():
                assert "NOTIFY_SOCKET" not in environ_of(pid), pid
        finally:
            assert server.stop() == 0
        assert "STOPPING=1" in notify.recv(4096).decode().splitlines()
