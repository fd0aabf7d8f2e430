"""[app] user and group: a corral started as root runs the app's workers and
deploy step as a real unprivileged user (checked in /proc/PID/status), never
as root unless allowed, and a corral that is not root cannot switch."""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from corral.config import ConfigError, load, resolve_user
from tests.harness import APPS, ROOT, ServerProcess
from tests.test_restarts import get

USER = "corral-test"
# The deploy step reports who it runs as, from the kernel's own record.
DEPLOY = ('command = ["python", "-c", "print(*(l.strip() for l in open(\'/proc/self/status\') '
          'if l.startswith((\'Uid:\', \'Gid:\'))), sep=chr(10))"]')


def ids(pid: int | str) -> tuple[list[int], list[int]]:
    """Real, effective, saved and file-system uid and gid of `pid`."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            fields[name] = rest.split()
    return [int(v) for v in fields["Uid"]], [int(v) for v in fields["Gid"]]


@pytest.fixture(scope="module")
def user() -> pwd.struct_passwd:
    if os.geteuid() != 0:
        pytest.skip("switching users needs corral to run as root")
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", USER], check=True)
        return pwd.getpwnam(USER)


@pytest.fixture
def base():
    """A folder every user may enter: pytest's own temp folders are root's
    alone (0700), so a worker of another user could not reach the app."""
    folder = Path(tempfile.mkdtemp(prefix="corral-users-", dir="/tmp"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def system_python() -> str:
    """A Python 3.11+ outside /root: corral's own interpreter may live in
    root's home, which the test user cannot enter."""
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.access(candidate, os.X_OK) and subprocess.run(
                [candidate, "-c", "import sys, venv; assert sys.version_info >= (3, 11)"],
                capture_output=True).returncode == 0:
            return candidate
    message = "no Python 3.11+ outside /root for the test user's virtual environment"
    if os.environ.get("CI"):
        pytest.fail(message + ", and CI is set")
    pytest.skip(message)


def user_app(base: Path, config: str, owner: pwd.struct_passwd | None) -> Path:
    """The restarts app with a virtual environment of a Python the test user
    can run, owned by `owner` (None: root)."""
    app = base / "app"
    app.mkdir()
    shutil.copy(APPS / "restarts" / "app.py", app)
    (app / "corral.toml").write_text(
        f'[app]\nwsgi = "app:application"\nprocesses = 2\n{config}\n'
        f'[env]\nPYTHONPATH = "."\n[deploy]\n{DEPLOY}\n')
    subprocess.run([system_python(), "-m", "venv", "--without-pip", str(app / ".venv")],
                   check=True)
    if owner is not None:
        for path in [app, *app.rglob("*")]:
            os.lchown(path, owner.pw_uid, owner.pw_gid)
    return app


def without_allow_root() -> dict:
    return {k: v for k, v in os.environ.items() if k != "CORRAL_ALLOW_ROOT"}


def start_without_allow_root(app: Path) -> ServerProcess:
    saved = os.environ.pop("CORRAL_ALLOW_ROOT", None)
    try:
        return ServerProcess(app).wait_ready()
    finally:
        if saved is not None:
            os.environ["CORRAL_ALLOW_ROOT"] = saved


def check_runs_as(server: ServerProcess, app: Path, uid: int, gid: int) -> None:
    pids = server.worker_pids()
    assert len(pids) == 2
    for pid in pids:
        assert ids(pid) == ([uid] * 4, [gid] * 4), f"worker pid {pid}"
    for _ in range(4):
        status, body = get(server.port, "/")
        assert status == 200 and int(body) in pids
    log = (app / "log" / "deploy.log").read_text()
    assert re.search(rf"Uid:\s+{uid}\s+{uid}\s+{uid}\s+{uid}\n", log), log
    assert re.search(rf"Gid:\s+{gid}\s+{gid}\s+{gid}\s+{gid}\n", log), log
    assert "deploy step finished: exit status 0" in log
    # The supervisor itself stays root: it must bind, signal and reap.
    assert ids(server.proc.pid)[0][1] == 0


def test_workers_and_deploy_step_run_as_the_app_folders_owner(user, base):
    app = user_app(base, "", owner=user)
    server = start_without_allow_root(app)
    try:
        assert f"run as user {USER}, group " in server.log
        check_runs_as(server, app, user.pw_uid, user.pw_gid)
        assert "WARNING" not in server.log
        # The app's user may touch tmp/restart.txt in the folder corral made.
        tmp = (app / "tmp").stat()
        assert (tmp.st_uid, tmp.st_gid) == (user.pw_uid, user.pw_gid)
    finally:
        assert server.stop() == 0


def test_user_and_group_named_in_the_config(user, base):
    try:
        group = grp.getgrnam("nogroup")
    except KeyError:
        pytest.skip("no group named nogroup on this machine")
    app = user_app(base, f'user = "{USER}"\ngroup = "nogroup"', owner=None)
    server = start_without_allow_root(app)
    try:
        check_runs_as(server, app, user.pw_uid, group.gr_gid)
        # A restart's new generation runs as them too.
        (app / "tmp").mkdir(exist_ok=True)
        (app / "tmp" / "restart.txt").touch()
        server.wait_for(r"generation 2 of app serves")
        for pid in server.worker_pids():
            assert ids(pid)[0] == [user.pw_uid] * 4
    finally:
        assert server.stop() == 0


def test_root_is_refused_unless_allowed(user, base):
    app = user_app(base, "", owner=None)  # root's folder, no user named
    done = subprocess.run([sys.executable, "-m", "corral", "serve", str(app),
                           "--bind", "127.0.0.1:0"], capture_output=True, text=True,
                          timeout=60, env={**without_allow_root(), "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2
    assert f"{app / 'corral.toml'}: [app] user: the workers would run as root" in done.stderr
    assert 'Fix: set user = "NAME"' in done.stderr and "chown" in done.stderr
    assert "--allow-root" in done.stderr
    (app / "corral.toml").write_text((app / "corral.toml").read_text().replace(
        "[app]\n", '[app]\nuser = "root"\n'))
    done = subprocess.run([sys.executable, "-m", "corral", "serve", str(app)],
                          capture_output=True, text=True, timeout=60,
                          env={**without_allow_root(), "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2 and "[app] user = 'root'" in done.stderr

    saved = os.environ.pop("CORRAL_ALLOW_ROOT", None)
    try:
        server = ServerProcess(app, "--allow-root").wait_ready()
    finally:
        if saved is not None:
            os.environ["CORRAL_ALLOW_ROOT"] = saved
    try:
        warnings = [line for line in server.lines if " WARNING " in line]
        assert len(warnings) == 1 and "run as root" in warnings[0]
        assert all(ids(pid)[0] == [0] * 4 for pid in server.worker_pids())
        assert get(server.port, "/")[0] == 200
    finally:
        assert server.stop() == 0


def test_a_corral_that_is_not_root_cannot_switch(user, base):
    app = user_app(base, f'user = "{USER}"', owner=user)
    config = load(app)
    other = load(app)
    other.app["user"] = "root"
    groups = os.getgroups()
    os.setgroups([user.pw_gid])
    os.setegid(user.pw_gid)
    os.seteuid(user.pw_uid)  # this process, briefly: corral as the test user
    try:
        assert resolve_user(config) is None  # naming itself: no switch needed
        with pytest.raises(ConfigError) as raised:
            resolve_user(other)
        nogroup = load(app)
        nogroup.app["user"], nogroup.app["group"] = None, "root"
        with pytest.raises(ConfigError) as raised_group:
            resolve_user(nogroup)
    finally:
        os.seteuid(0)
        os.setegid(0)
        os.setgroups(groups)
    message = str(raised.value)
    assert message.startswith(f"{app / 'corral.toml'}: [app] user: corral runs as {USER}")
    assert "only root can run the workers as 'root'" in message
    assert "Fix: start corral as root, or remove user" in message
    assert "[app] group: corral runs as" in str(raised_group.value)


def test_an_unknown_user_is_a_config_error(user, base):
    app = user_app(base, 'user = "no-such-user-here"', owner=None)
    with pytest.raises(ConfigError) as raised:
        resolve_user(load(app))
    assert "[app] user: no user 'no-such-user-here' on this machine" in str(raised.value)
