"""Reading an app's `corral.toml` (or recognising a bare Django project) into
plain typed objects.  Nothing is started here; every error names the file, the
key and what to do about it.
"""

from __future__ import annotations

import os
import re
import shutil
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from corral.settings import (
    BUILTIN_ENGINE,
    BY_NAME,
    FREE_SECTIONS,
    NAMED_SECTIONS,
    SECTIONS,
    SETTINGS,
    Setting,
)
from corral.venv import app_python

CONFIG_NAME = "corral.toml"


class ConfigError(Exception):
    """A config that cannot be served; str() is the whole message for the user."""

    def __init__(self, file: Path | str, key: str | None, problem: str, fix: str) -> None:
        where = f"{file}: {key}" if key else str(file)
        super().__init__(f"{where}: {problem}. Fix: {fix}")
        self.file, self.key = str(file), key


@dataclass(frozen=True)
class Bind:
    """A listening address of the front: TCP host and port, or a unix socket
    path, speaking HTTP (the default) or FastCGI (to a web server in front)."""
    host: str = "127.0.0.1"
    port: int = 8000
    path: str | None = None
    protocol: str = "http"  # or "fastcgi"

    FORMS = ('"HOST:PORT", "unix:PATH", "fastcgi+unix:PATH" or "fastcgi+tcp:HOST:PORT"')

    @classmethod
    def parse(cls, text: str) -> Bind:
        protocol = "http"
        if text.startswith("fastcgi+"):
            protocol, text = "fastcgi", text[len("fastcgi+"):]
            text = text.removeprefix("tcp:")
        elif text.startswith("http+"):
            text = text[len("http+"):].removeprefix("tcp:")
        if text.startswith("unix:"):
            if not text[5:]:
                raise ValueError("unix: needs a socket path")
            return cls(path=text[5:], protocol=protocol)
        # A host name or IPv4 address, or an IPv6 address in brackets.
        match = re.fullmatch(r"(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9.-]*)):(\d{1,5})", text)
        if not match or int(match.group(3)) > 65535:
            raise ValueError(f"{text!r} is not one of {cls.FORMS}")
        host = match.group(1) or match.group(2) or "127.0.0.1"
        return cls(host=host, port=int(match.group(3)), protocol=protocol)

    def __str__(self) -> str:
        prefix = "fastcgi+" if self.protocol == "fastcgi" else ""
        if self.path:
            return f"{prefix}unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{prefix}{'tcp:' if prefix else ''}{host}:{self.port}"


@dataclass
class DeployStep:
    argv: list[str] | None  # None: the app has no deploy step
    log: Path
    timeout: float
    hold: float
    exclusive: bool = False  # the old generation stops first; the step runs alone


@dataclass
class Engine:
    """How an app's workers are started and reached (docs/engines.md)."""
    name: str = BUILTIN_ENGINE
    command: tuple[str, ...] | None = None  # program found on PATH; {port} left in
    transport: str = "unix"  # unix or tcp
    env: dict[str, str] = field(default_factory=dict)
    ports: tuple[int, int] | None = None  # inclusive range, for transport tcp
    address: Bind | None = None  # a server corral connects to but does not start

    @property
    def builtin(self) -> bool:
        return self.name == BUILTIN_ENGINE

    @property
    def listens_itself(self) -> bool:
        """The command binds its own port ({port}) instead of taking fd 0."""
        return bool(self.command) and any("{port}" in arg for arg in self.command)


@dataclass
class AppConfig:
    root: Path
    config_file: Path | None
    wsgi: str
    processes: int  # the most workers: [app] processes, or the MAX of its range
    mount: str
    queue: int
    queue_timeout: float
    boot_timeout: float
    python: str
    env: dict[str, str]
    deploy: DeployStep
    static: list[tuple[str, Path]]
    server: dict[str, object] = field(default_factory=dict)
    app: dict[str, object] = field(default_factory=dict)  # every [app] key, checked
    engine: Engine = field(default_factory=Engine)
    docroot: Path | None = None  # [app] root, resolved: where scripts are found
    index: str = "index.php"
    # [app] processes is the range min_processes..processes (equal when fixed).
    min_processes: int = 1
    run_as: RunAs | None = None  # set by `corral serve` (resolve_user): None, no switch

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def source(self) -> str:
        """What to name in messages about this app's config."""
        return str(self.config_file or self.root)


def _check(setting: Setting, value, file: Path, where: str | None = None):
    """`value` converted to the setting's kind, or ConfigError naming `where`
    (default: the setting's own name)."""
    kind = setting.kind
    if kind == "processes":
        return _processes(value, file, where or setting.name)
    ok = {
        "str": isinstance(value, str),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "command": isinstance(value, list) and bool(value)
                   and all(isinstance(v, str) for v in value),
        "addresses": isinstance(value, str) or (
            isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)),
        "choice": value in setting.choices,
        "table": isinstance(value, dict) and all(isinstance(v, str) for v in value.values()),
        "globs": isinstance(value, list) and all(isinstance(v, str) and v for v in value),
    }[kind]
    if not ok:
        wanted = {"str": "a string", "int": "an integer", "float": "a number",
                  "bool": "true or false",
                  "command": "a non-empty list of strings",
                  "addresses": "an address or a list of addresses",
                  "choice": "one of " + ", ".join(f'"{c}"' for c in setting.choices),
                  "table": 'a table of strings, e.g. { NAME = "value" }',
                  "globs": 'a list of globs, e.g. ["**/*.py"]'}[kind]
        raise ConfigError(file, where or setting.name, f"expected {wanted}, got {value!r}",
                          f"set {setting.key} to {wanted} ({setting.help})")
    if setting.minimum is not None and value < setting.minimum:
        raise ConfigError(file, where or setting.name, f"{value!r} is below {setting.minimum:g}",
                          f"use a value of at least {setting.minimum:g}")
    return float(value) if kind == "float" else value


def _processes(value, file: Path, where: str) -> tuple[int, int]:
    """[app] processes as (MIN, MAX): a number N is (N, N)."""
    if isinstance(value, tuple):
        return value  # checked already
    fix = 'write a number of workers (e.g. 4) or a range "MIN-MAX" (e.g. "0-4", "2-8")'
    if isinstance(value, int) and not isinstance(value, bool):
        low = high = value
    elif isinstance(value, str) and re.fullmatch(r"\s*\d+\s*(-\s*\d+\s*)?", value):
        first, _, second = value.partition("-")
        low = int(first)
        high = int(second) if second else low
    else:
        raise ConfigError(file, where, f"expected an integer or a range \"MIN-MAX\", got "
                          f"{value!r}", fix)
    if low > high:
        raise ConfigError(file, where, f"{value!r}: the minimum {low} is above the maximum "
                          f"{high}", f'put the smaller number first: "{high}-{low}"')
    if high < 1:
        raise ConfigError(file, where, f"{value!r} allows no worker at all (a MAX below 1)",
                          'allow at least 1 worker; to scale to zero, use a range such '
                          'as "0-4"')
    return low, high


def _named_tables(section: str, tables: dict, file: Path) -> dict[str, dict]:
    """The checked keys of each [section.NAME] table, by NAME."""
    known = ", ".join(s.key for s in SETTINGS if s.section == section)
    found = {}
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise ConfigError(file, f"[{section}] {name}", "is not a table",
                              f"declare it as a [{section}.NAME] table with the keys {known}")
        checked = {}
        for key, value in table.items():
            setting = BY_NAME.get((section, key))
            if setting is None:
                raise ConfigError(file, f"[{section}.{name}] {key}", "unknown key",
                                  f"remove it or use one of: {known}")
            checked[key] = _check(setting, value, file, setting.name_in(name))
        found[name] = checked
    return found


def _engine(name: str, tables: dict[str, dict], file: Path, root: Path,
            app_env: dict[str, str], processes: int) -> Engine:
    """The declared engine `name`, checked as far as it can be without
    starting it: the program is on PATH, the port range fits the workers."""
    if name not in tables:
        declared = ", ".join(repr(n) for n in tables) or "none"
        raise ConfigError(file, "[app] engine",
                          f"no engine named {name!r} is declared (declared: {declared})",
                          f"declare it in an [engines.{name}] table with a command or "
                          f"an address, or use the built-in \"{BUILTIN_ENGINE}\"")
    table = tables[name]

    def key(k: str) -> str:
        return BY_NAME[("engines", k)].name_in(name)

    command, address = table.get("command"), table.get("address")
    if command and address:
        raise ConfigError(file, key("address"), "both command and address are set",
                          "keep command to have corral start and supervise the engine, "
                          "or address to connect to a FastCGI server that runs already")
    if address:
        for k in ("transport", "ports", "env"):
            if k in table:
                raise ConfigError(file, key(k), "does not apply to an engine with an "
                                  "address, which corral does not start",
                                  f"remove {k}, or replace address with a command")
        try:
            if address.startswith(("fastcgi+", "http+")):
                raise ValueError(f"{address!r} is not HOST:PORT or unix:PATH")
            bind = Bind.parse(address)
        except ValueError as exc:
            raise ConfigError(file, key("address"), str(exc),
                              'write it as "127.0.0.1:9000" or "unix:/run/app.sock"') from None
        return Engine(name, transport="unix" if bind.path else "tcp", address=bind)
    if not command:
        raise ConfigError(file, f"[engines.{name}]", "has neither command nor address",
                          'add command = ["php-cgi"] (a FastCGI program corral starts) '
                          'or address = "127.0.0.1:9000" (a server that runs already)')

    transport = table.get("transport", "unix")
    ports = None
    text = table.get("ports")
    if text is not None:
        if transport != "tcp":
            raise ConfigError(file, key("ports"), "only the tcp transport uses ports",
                              'set transport = "tcp", or remove ports')
        match = re.fullmatch(r"\s*(\d{1,5})\s*-\s*(\d{1,5})\s*", text)
        low, high = (int(match.group(1)), int(match.group(2))) if match else (0, 0)
        if not 1 <= low <= high <= 65535:
            raise ConfigError(file, key("ports"), f"{text!r} is not a port range",
                              'write it as "LOW-HIGH" with 1 <= LOW <= HIGH <= 65535, '
                              'e.g. "9100-9199"')
        if high - low + 1 < processes:
            raise ConfigError(file, key("ports"),
                              f"{text!r} has {high - low + 1} ports for {processes} workers",
                              f"widen it to at least {processes} ports, or lower "
                              "[app] processes")
        ports = (low, high)
    if any("{port}" in arg for arg in command):
        if transport != "tcp":
            raise ConfigError(file, key("command"), "has a {port} placeholder but the "
                              "transport is unix", 'set transport = "tcp" and ports, '
                              'or drop {port} to give the program its socket on fd 0')
        if ports is None:
            raise ConfigError(file, key("ports"), "the command has a {port} placeholder "
                              "but no ports are given",
                              'set ports = "9100-9199" (a range with a port for every worker)')

    # Found now, with the PATH the workers will have, so a typo stops
    # `corral serve` at once instead of failing every spawn.
    env = table.get("env") or {}
    search = {**os.environ, **env, **app_env}.get("PATH", os.defpath)
    program = command[0]
    if "/" in program:
        # Absolute, but symlinks kept: a virtual environment's bin/python is
        # a symlink, and resolving it would run the base interpreter instead.
        path = Path(os.path.normpath(root / program))
        found = str(path) if path.is_file() and os.access(path, os.X_OK) else None
        where = f"{path} is not an executable file"
    else:
        found = shutil.which(program, path=search)
        where = f"{program!r} is not found on PATH ({search})"
    if found is None:
        raise ConfigError(file, key("command"), where,
                          "install the program (php-cgi: apt-get install php-cgi), "
                          "or give its path, absolute or relative to the app folder")
    return Engine(name, command=(found, *command[1:]), transport=transport,
                  env=dict(env), ports=ports)


def _tls_context(server: dict, root: Path, source):
    """An ssl.SSLContext from [server] certificate and key, or None."""
    cert, key = server["certificate"], server["key"]
    if not cert and not key:
        return None
    if not (cert and key):
        missing = "key" if cert else "certificate"
        raise ConfigError(source, f"[server] {missing}", "is needed with the other one",
                          "give both certificate and key, or neither")
    import ssl
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.set_alpn_protocols(["http/1.1"])
    try:
        context.load_cert_chain(root / cert, root / key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(source, "[server] certificate",
                          f"cannot load {root / cert} with {root / key} ({exc})",
                          "give a PEM certificate chain and its private key") from None
    return context


def _metrics_bind(text: str, source) -> Bind:
    """[server] metrics as an address; only plain HTTP forms make sense."""
    try:
        if text.startswith(("fastcgi+", "http+")):
            raise ValueError(f"{text!r} is not HOST:PORT or unix:PATH")
        return Bind.parse(text)
    except ValueError as exc:
        raise ConfigError(source, "[server] metrics", str(exc),
                          'write it as "127.0.0.1:9108" or "unix:/run/corral/metrics.sock"'
                          ) from None


@dataclass(frozen=True)
class RunAs:
    """The user and groups an app's workers and deploy step run as."""
    uid: int
    gid: int
    user: str
    group: str
    groups: tuple[int, ...]  # supplementary groups, the user's own
    home: str | None = None

    def preexec(self, then=None):
        """A preexec_fn that switches to this user and its groups in the
        child, between fork and exec, then calls `then` (if any).  Not
        subprocess's user= and group=: uvloop does not take them."""
        uid, gid, groups = self.uid, self.gid, list(self.groups)

        def in_child() -> None:
            os.setgroups(groups)  # first: only root may, and setuid ends that
            os.setgid(gid)
            os.setuid(uid)
            if then is not None:
                then()
        return in_child

    def adjust_env(self, env: dict[str, str], app_env: dict[str, str]) -> None:
        """HOME, USER and LOGNAME of the user in `env`, unless the app's [env]
        sets them: root's HOME would send caches and dotfiles where the user
        cannot write."""
        for key, value in (("HOME", self.home), ("USER", self.user), ("LOGNAME", self.user)):
            if value and key not in app_env:
                env[key] = value


def resolve_user(config: AppConfig, allow_root: bool = False) -> RunAs | None:
    """Who the app's processes run as: None when no switch is made (corral
    is not root, or is allowed to run the app as root).  ConfigError when the
    user cannot be used, and when it is root without `allow_root`."""
    import grp
    import pwd

    user, group = config.app.get("user"), config.app.get("group")
    source = config.source

    def by_name(table, name: str, key: str):
        try:
            return table.getpwnam(name) if table is pwd else table.getgrnam(name)
        except KeyError:
            if name.isdigit():
                try:
                    return table.getpwuid(int(name)) if table is pwd else table.getgrgid(int(name))
                except KeyError:
                    pass
        raise ConfigError(source, key, f"no {'user' if table is pwd else 'group'} "
                          f"{name!r} on this machine",
                          f"create it (useradd --system {name}) or name an existing one"
                          if table is pwd else f"create it (groupadd --system {name}) or "
                          "name an existing one") from None

    if os.geteuid() != 0:
        me = pwd.getpwuid(os.geteuid()).pw_name if _has_uid(os.geteuid()) else str(os.geteuid())
        if user is not None and by_name(pwd, user, "[app] user").pw_uid != os.geteuid():
            raise ConfigError(source, "[app] user",
                              f"corral runs as {me}, and only root can run the workers as "
                              f"{user!r}", "start corral as root, or remove user (the "
                              "workers then run as corral's own user)")
        if group is not None and by_name(grp, group, "[app] group").gr_gid not in (
                os.getegid(), *os.getgroups()):
            raise ConfigError(source, "[app] group",
                              f"corral runs as {me}, which cannot switch to group {group!r}",
                              "start corral as root, or remove group")
        return None

    if user is not None:
        entry = by_name(pwd, user, "[app] user")
        uid, gid, name, home = entry.pw_uid, entry.pw_gid, entry.pw_name, entry.pw_dir
        why = f"[app] user = {user!r}"
    else:
        folder = config.root.stat()
        uid, gid, name, home = folder.st_uid, folder.st_gid, str(folder.st_uid), None
        if _has_uid(uid):
            entry = pwd.getpwuid(uid)
            gid, name, home = entry.pw_gid, entry.pw_name, entry.pw_dir
        why = f"[app] user is not set and the app folder {config.root} is owned by {name}"
    if group is not None:
        gid = by_name(grp, group, "[app] group").gr_gid
    if uid == 0:
        if not allow_root:
            raise ConfigError(source, "[app] user",
                              f"the workers would run as root ({why})",
                              'set user = "NAME" to an unprivileged user (e.g. www-data), '
                              f"or chown the app folder to one (chown -R www-data: "
                              f"{config.root}); to run them as root anyway, start with "
                              "corral serve --allow-root (or CORRAL_ALLOW_ROOT=1)")
        return None
    try:
        group_name = grp.getgrgid(gid).gr_name
    except KeyError:
        group_name = str(gid)
    groups = os.getgrouplist(name, gid) if _has_uid(uid) else [gid]
    return RunAs(uid, gid, name, group_name, tuple(groups), home)


def _has_uid(uid: int) -> bool:
    import pwd
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def _read_toml(file: Path) -> dict:
    try:
        with open(file, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(file, None, f"not valid TOML ({exc})",
                          "correct the syntax at that line") from None
    except OSError as exc:
        raise ConfigError(file, None, f"cannot be read ({exc.strerror})",
                          "check the path and its permissions") from None


def _django_settings_module(root: Path) -> str | None:
    """The settings module manage.py sets as its default, if it says."""
    try:
        text = (root / "manage.py").read_text(encoding="utf-8")
    except OSError:
        return None
    match = re.search(r"""DJANGO_SETTINGS_MODULE['"]\s*,\s*['"]([\w.]+)['"]""", text)
    return match.group(1) if match else None


def _resolve_pythonpath(value: str, root: Path) -> str:
    parts = [str((root / p).resolve()) for p in value.split(os.pathsep) if p]
    return os.pathsep.join(parts)


def load(root: str | Path = ".", overrides: dict | None = None) -> AppConfig:
    """The app in folder `root`, from its corral.toml or as a Django project."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise ConfigError(root, None, "is not a folder",
                          "give corral serve the folder that holds the app")
    file = root / CONFIG_NAME
    data = _read_toml(file) if file.exists() else None
    config_file = file if data is not None else None
    source = file if data is not None else root
    if data is None:
        if not (root / "manage.py").exists():
            raise ConfigError(root, None, f"has no {CONFIG_NAME} and no manage.py",
                              f"write a {CONFIG_NAME} (see docs/config.md) or "
                              "serve a Django project folder")
        data = {}

    # 1. Unknown sections and keys are errors, never silently ignored.
    values: dict[tuple[str, str], object] = {}
    named: dict[str, dict[str, dict]] = {section: {} for section in NAMED_SECTIONS}
    for section, table in data.items():
        if section not in SECTIONS:
            raise ConfigError(source, f"[{section}]", "unknown section",
                              f"use one of {', '.join(f'[{s}]' for s in SECTIONS)}")
        if not isinstance(table, dict):
            raise ConfigError(source, f"[{section}]", "is not a table",
                              f"write it as a [{section}] section")
        if section in FREE_SECTIONS:
            continue
        if section in NAMED_SECTIONS:
            named[section] = _named_tables(section, table, source)
            continue
        for key, value in table.items():
            setting = BY_NAME.get((section, key))
            if setting is None:
                known = ", ".join(s.key for s in SETTINGS if s.section == section)
                raise ConfigError(source, f"[{section}] {key}", "unknown key",
                                  f"remove it or use one of: {known}")
            values[(section, key)] = _check(setting, value, source)
    for (section, key), value in (overrides or {}).items():
        if value is not None:
            values[(section, key)] = _check(BY_NAME[(section, key)], value, source)

    def get(section: str, key: str):
        return values.get((section, key), BY_NAME[(section, key)].default)

    # 2. [env]: strings only; PYTHONPATH made absolute against the app folder.
    env: dict[str, str] = {}
    for key, value in data.get("env", {}).items():
        if not isinstance(value, str):
            raise ConfigError(source, f"[env] {key}", f"expected a string, got {value!r}",
                              f'quote the value: {key} = "{value}"')
        env[key] = value
    settings_module = env.get("DJANGO_SETTINGS_MODULE") or _django_settings_module(root)
    if settings_module and "DJANGO_SETTINGS_MODULE" not in env:
        env["DJANGO_SETTINGS_MODULE"] = settings_module
    env["PYTHONPATH"] = _resolve_pythonpath(env.get("PYTHONPATH", "."), root)

    # 3. The engine: the built-in python one, or one declared by name.  Keys
    # that only one kind of engine reads are errors with the other kind.
    name = get("app", "engine")
    if BUILTIN_ENGINE in named["engines"]:
        raise ConfigError(source, f"[engines.{BUILTIN_ENGINE}]",
                          f"{BUILTIN_ENGINE!r} is the built-in engine",
                          "give your engine another name")
    fewest, most = _processes(get("app", "processes"), source, "[app] processes")
    if name == BUILTIN_ENGINE:
        engine = Engine(transport=get("app", "transport"))
        wrong = ("root", "index")
    else:
        engine = _engine(name, named["engines"], source, root, env, most)
        wrong = ("wsgi", "transport", "spawn_mode")
    if engine.address is not None and fewest != most:
        raise ConfigError(source, "[app] processes",
                          f"a range ({fewest}-{most}) scales workers corral starts, and the "
                          f"engine {name!r} is a server at {engine.address}",
                          f"give the number of connections to keep, e.g. processes = {most}")
    for key in wrong:
        if ("app", key) in values:
            raise ConfigError(source, f"[app] {key}",
                              f"does not apply to the engine {name!r}",
                              f"remove it (see docs/engines.md for what the {name!r} "
                              "engine reads)")
    docroot = None
    if get("app", "root") is not None:
        docroot = (root / get("app", "root")).resolve()
        if not docroot.is_dir():
            raise ConfigError(source, "[app] root", f"folder {docroot} does not exist",
                              "create it or correct the path (relative to the app folder)")
    index = get("app", "index")
    if not index or index.startswith("/") or ".." in index.split("/"):
        raise ConfigError(source, "[app] index", f"{index!r} is not a file name",
                          'use a name in the document root, e.g. "index.php"')

    # 4. The WSGI callable: given, or the Django project's own.
    wsgi = get("app", "wsgi")
    if not engine.builtin:
        wsgi = ""  # the engine's own program serves the app
    elif wsgi is None:
        if not settings_module:
            raise ConfigError(source, "[app] wsgi", "no WSGI callable is named",
                              'set wsgi = "package.module:application"')
        package = settings_module.rpartition(".")[0]
        if package and (root / package.replace(".", "/") / "wsgi.py").exists():
            wsgi = f"{package}.wsgi:application"
        else:
            wsgi = "corral.django:application"
    elif not re.fullmatch(r"[\w.]+:[\w.]+", wsgi):
        raise ConfigError(source, "[app] wsgi", f"{wsgi!r} is not module:callable",
                          'write it as "package.module:application"')

    mount = get("app", "mount")
    if not mount.startswith("/") or "//" in mount:
        raise ConfigError(source, "[app] mount", f"{mount!r} is not a URL path",
                          'use "/" or a prefix such as "/blog"')
    mount = mount.rstrip("/")

    # 5. The deploy step: [deploy] file or command, or DEPLOY_FILE in [env].
    python = app_python(root, source)  # the app's own venv, else corral's interpreter
    deploy_file = env.get("DEPLOY_FILE") or get("deploy", "file")
    command = get("deploy", "command")
    if deploy_file and command:
        raise ConfigError(source, "[deploy] command", "both file and command are set",
                          "keep one of them")
    argv = None
    if deploy_file:
        path = root / deploy_file
        if not path.is_file():
            key = "[env] DEPLOY_FILE" if env.get("DEPLOY_FILE") else "[deploy] file"
            raise ConfigError(source, key, f"{path} does not exist",
                              "create the file or correct the path (relative to the app folder)")
        argv = [python, str(path)]
    elif command:
        argv = [python if command[0] == "python" else command[0], *command[1:]]
    elif config_file is None and settings_module:
        argv = [python, "manage.py", "migrate", "--noinput"]
    deploy = DeployStep(argv=argv,
                        log=root / (env.get("DEPLOY_LOG") or get("deploy", "log")),
                        timeout=get("deploy", "timeout"), hold=get("deploy", "hold"),
                        exclusive=get("deploy", "exclusive"))

    # 6. Static mappings: every folder must exist and stay a folder.
    static = []
    for prefix, folder in data.get("static", {}).items():
        key = f'[static] "{prefix}"'
        if not prefix.startswith("/"):
            raise ConfigError(source, key, "a URL prefix must start with /",
                              f'write "/{prefix}"')
        if not isinstance(folder, str):
            raise ConfigError(source, key, f"expected a folder name, got {folder!r}",
                              "give the folder as a string")
        path = (root / folder).resolve()
        if not path.is_dir():
            raise ConfigError(source, key, f"folder {path} does not exist",
                              "create it or correct the path (relative to the app folder)")
        static.append((prefix.rstrip("/") + "/", path))
    static.sort(key=lambda item: -len(item[0]))  # longest prefix first

    server = {key: get("server", key) for (section, key) in BY_NAME if section == "server"}
    binds = server["bind"]
    try:
        server["bind"] = [Bind.parse(text) for text in
                          ([binds] if isinstance(binds, str) else binds)]
    except ValueError as exc:
        raise ConfigError(source, "[server] bind", str(exc),
                          f"use {Bind.FORMS}, e.g. \"127.0.0.1:8000\"") from None
    if not re.fullmatch(r"0?[0-7]{3}", server["socket_mode"]):
        raise ConfigError(source, "[server] socket_mode",
                          f"{server['socket_mode']!r} is not an octal mode",
                          'write it as a string of octal digits, e.g. "0660"')
    server["tls"] = _tls_context(server, root, source)
    if server["metrics"] is not None:
        server["metrics"] = _metrics_bind(server["metrics"], source)
    for pattern in get("app", "watch"):
        if pattern.startswith("/") or ".." in pattern.split("/"):
            raise ConfigError(source, "[app] watch", f"{pattern!r} leaves the app folder",
                              'write globs relative to the app folder, e.g. "**/*.py"')
    proxies = server["trusted_proxies"]
    server["trusted_proxies"] = frozenset([proxies] if isinstance(proxies, str) else proxies)

    return AppConfig(
        root=root, config_file=config_file, wsgi=wsgi,
        processes=most, min_processes=fewest, mount=mount,
        queue=get("app", "queue"), queue_timeout=get("app", "queue_timeout"),
        boot_timeout=get("app", "boot_timeout"), python=python,
        env=env, deploy=deploy, static=static, server=server,
        app={key: get("app", key) for (section, key) in BY_NAME if section == "app"}
        | {"processes": (fewest, most)},
        engine=engine, docroot=docroot, index=index)
