"""systemd: the notify protocol (READY=1, STOPPING=1 on $NOTIFY_SOCKET), the
listening sockets systemd passes (sd_listen_fds(3)), and `corral systemd`'s
service and socket units.  Written from the protocol's description, without
libsystemd: each part is a few lines.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import re
import socket
from pathlib import Path

from corral.config import AppConfig, Bind

log = logging.getLogger("corral.error")

LISTEN_FDS_START = 3  # systemd passes its sockets from this descriptor on


class Notifier:
    """Sends state lines to the service manager; does nothing when corral
    was not started by one (no NOTIFY_SOCKET)."""

    def __init__(self, address: str | None) -> None:
        # "@name" is a socket in the abstract namespace (leading NUL byte).
        if address and address.startswith("@"):
            address = "\0" + address[1:]
        self.address = address or None

    @classmethod
    def from_environ(cls) -> Notifier:
        """The notifier systemd asked for.  The variable is removed, so the
        workers and the deploy step, which inherit our environment, do not
        think they are the service's main process."""
        return cls(os.environ.pop("NOTIFY_SOCKET", None))

    def send(self, *lines: str) -> None:
        if self.address is None:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                # MSG_DONTWAIT: a service manager that does not read must not
                # block the event loop; losing a status line is harmless.
                sock.sendto("\n".join(lines).encode(), socket.MSG_DONTWAIT, self.address)
        except OSError as exc:
            log.warning("cannot notify the service manager at %s: %s",
                        self.address.replace("\0", "@"), exc.strerror or exc)


def protocol_of(name: str) -> str:
    """What a passed socket speaks, from its FileDescriptorName: "fastcgi"
    for names that start so, else "http"."""
    return "fastcgi" if name.startswith("fastcgi") else "http"


def listen_sockets() -> list[tuple[socket.socket, str]]:
    """The listening sockets systemd passed to this process, with the
    protocol each speaks; [] when there are none.

    systemd sets LISTEN_PID to the pid it started and LISTEN_FDS to the
    number of sockets, from fd 3 on, and may name them in LISTEN_FDNAMES
    (colon-separated).  The variables are removed and the descriptors made
    non-inheritable, so no child takes them for its own.  ValueError for
    variables or descriptors that are not what systemd passes.
    """
    pid = os.environ.pop("LISTEN_PID", None)
    count = os.environ.pop("LISTEN_FDS", None)
    names = os.environ.pop("LISTEN_FDNAMES", "")
    if pid is None or count is None:
        return []
    if not pid.isdigit() or int(pid) != os.getpid():
        return []  # meant for the process that started us, not for us
    if not count.isdigit():
        raise ValueError(f"LISTEN_FDS={count!r} is not a number")
    found = []
    labels = names.split(":") if names else []
    for i in range(int(count)):
        fd = LISTEN_FDS_START + i
        try:
            os.set_inheritable(fd, False)
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise ValueError(f"descriptor {fd} from LISTEN_FDS is not a socket "
                             f"({exc.strerror})") from None
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(
                socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ValueError(f"descriptor {fd} from LISTEN_FDS is not a listening stream "
                             "socket; use ListenStream= in the socket unit")
        label = labels[i] if i < len(labels) else ""
        found.append((sock, protocol_of(label)))
    return found


# -- units -------------------------------------------------------------------

def unit_name(config: AppConfig) -> str:
    """corral-APP, with what systemd does not allow in a unit name replaced."""
    return "corral-" + (re.sub(r"[^A-Za-z0-9_.-]", "-", config.name) or "app")


def _escape(value: str) -> str:
    """A value with systemd's specifier signs (%) made literal."""
    return value.replace("%", "%%")


def _word(arg: str) -> str:
    """One ExecStart argument, quoted the way systemd splits command lines."""
    arg = _escape(arg).replace("$", "$$")  # Exec lines also expand $VARIABLES
    if arg and not re.search(r'[\s"\'\\;]', arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def listen_stream(bind: Bind, root: Path) -> str:
    """A bind address as a socket unit's ListenStream= value.  ValueError for
    what systemd cannot listen on for us."""
    if bind.path:
        return str((root / bind.path).resolve())
    try:
        address = ipaddress.ip_address(bind.host)
    except ValueError:
        raise ValueError(f"{bind} names a host; a socket unit needs an IP address, "
                         "e.g. 127.0.0.1:8000 or [::]:8000") from None
    if bind.port == 0:
        raise ValueError(f"{bind} has port 0; a socket unit needs a fixed port")
    host = f"[{address}]" if address.version == 6 else str(address)
    return f"{host}:{bind.port}"


def units(config: AppConfig, user: str, corral: list[str],
          with_socket: bool = False) -> dict[str, str]:
    """The unit files for serving `config`, by file name: the service, and
    with `with_socket` one socket unit per protocol the app is bound with."""
    name = unit_name(config)
    sockets: dict[str, list[str]] = {}
    if with_socket:
        for bind in config.server["bind"]:
            sockets.setdefault(bind.protocol, []).append(listen_stream(bind, config.root))
    socket_units = {}
    for protocol, streams in sockets.items():
        # The service's own name for the first, so systemd pairs them itself.
        unit = f"{name}.socket" if not socket_units else f"{name}-{protocol}.socket"
        socket_units[unit] = "\n".join([
            f"# {unit}: the sockets systemd listens on for {name}.service and",
            "# passes to it; corral then serves on them instead of binding.",
            "[Unit]",
            f"Description={_escape(f'corral {config.name}: {protocol} sockets')}",
            "",
            "[Socket]",
            *(f"ListenStream={_escape(s)}" for s in streams),
            f"FileDescriptorName={protocol}",
            *([] if unit == f"{name}.socket" else [f"Service={name}.service"]),
            "Backlog=1024",
            *(["# Only the web server in front may connect (nginx runs as www-data):",
               "# SocketGroup=www-data", "# SocketMode=0660"]
              if any(s.startswith("/") for s in streams) else []),
            "",
            "[Install]",
            "WantedBy=sockets.target",
            ""])

    graceful = float(config.server["graceful_timeout"])
    # Ready (READY=1) comes after the deploy step and the workers' boot.
    start = config.boot_timeout + (config.deploy.timeout if config.deploy.argv else 0)
    requires = " ".join(socket_units)
    # corral binds its unix sockets itself without socket units: a folder in
    # /run for them is made by systemd, owned by the user (and kept while
    # other apps' services still use it).
    runtime = sorted({Path(b.path).parent.name for b in config.server["bind"]
                      if b.path and not socket_units
                      and Path(b.path).parent.parent == Path("/run")})
    service = "\n".join([
        f"# {name}.service: corral serving {config.root}.",
        "[Unit]",
        f"Description={_escape(f'corral serving {config.name} ({config.root})')}",
        "After=network.target" + (f" {requires}" if requires else ""),
        *([f"Requires={requires}"] if requires else []),
        "",
        "[Service]",
        # corral says READY=1 once the workers answer, and STOPPING=1.
        "Type=notify",
        "NotifyAccess=main",
        f"User={user}",
        f"WorkingDirectory={_escape(str(config.root))}",
        "ExecStart=" + " ".join(_word(a) for a in [*corral, "serve", str(config.root)]),
        # `systemctl reload`: a new generation beside the old one, nothing lost.
        "ExecReload=/bin/kill -HUP $MAINPID",
        *([f"RuntimeDirectory={' '.join(runtime)}", "RuntimeDirectoryPreserve=yes"]
          if runtime else []),
        *([f"Sockets={requires}"] if len(socket_units) > 1 else []),
        "Restart=on-failure",
        "RestartSec=1",
        # Exit status 2 is a config the app cannot be served with: starting
        # again would fail the same way.
        "RestartPreventExitStatus=2",
        # SIGTERM to corral alone, which stops its workers after in-flight
        # requests finish; SIGKILL to whatever is left only at the timeout.
        "KillMode=mixed",
        "KillSignal=SIGTERM",
        f"TimeoutStartSec={math.ceil(start) + 30}",
        # The graceful timeout, then up to 5 s for workers to exit, and margin.
        f"TimeoutStopSec={math.ceil(graceful) + 15}",
        "Environment=PYTHONUNBUFFERED=1",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        ""])
    return {f"{name}.service": service, **socket_units}
