"""An app's own virtual environment: found in its folder (`.venv/` or `venv/`),
its interpreter runs the workers and the deploy step, and corral's worker is
made importable by it without installing corral there.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("corral.error")

VENV_FOLDERS = (".venv", "venv")
OLDEST = (3, 11)  # corral's own requires-python; the worker runs on it too


def _venv_version(cfg: Path) -> tuple[int, ...] | None:
    """The Python version pyvenv.cfg records, if it says."""
    try:
        lines = cfg.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        key, _, value = line.partition("=")
        if key.strip() in ("version", "version_info"):
            parts = value.strip().split(".")
            if len(parts) >= 2 and parts[0].isdigit() and parts[1].isdigit():
                return int(parts[0]), int(parts[1])
    return None


def app_python(root: Path, source: Path | str) -> str:
    """The interpreter for the app in `root`: its virtual environment's, else
    the one corral runs on.  ConfigError (naming `source`) for a virtual
    environment that is there but cannot run corral's worker."""
    from corral.config import ConfigError  # here: corral.config imports this module

    for folder in VENV_FOLDERS:
        venv = root / folder
        cfg = venv / "pyvenv.cfg"
        if not cfg.is_file():
            continue
        # Not resolved: a venv's python is a symlink to the base interpreter,
        # and only the path inside the venv makes Python use the venv.
        python = venv / "bin" / "python"
        if not os.access(python, os.X_OK):
            raise ConfigError(source, None, f"the virtual environment {venv} has no working "
                              f"{python.relative_to(root)} (its base Python may be gone)",
                              f"recreate it: rm -r {folder} && python3 -m venv {folder} && "
                              f"{folder}/bin/pip install -r requirements.txt")
        version = _venv_version(cfg)
        if version is not None and version < OLDEST:
            raise ConfigError(source, None, f"the virtual environment {venv} has Python "
                              f"{'.'.join(map(str, version))}; corral's worker needs "
                              f"{'.'.join(map(str, OLDEST))} or newer",
                              f"recreate it with a newer Python (python3.11 -m venv {folder})")
        return str(python)
    return sys.executable


def use_app_python(env: dict[str, str], python: str, run_dir: Path) -> None:
    """Make `env` (an app's [env], for its workers and deploy step) fit the
    interpreter `python` when it is not the one corral runs on.

    The worker is `python -m corral.worker`, so corral must be importable by
    that interpreter.  Putting the folder corral is installed in on
    PYTHONPATH would also put every package beside it (a system Django, say)
    ahead of the venv's own, so only a folder holding a link to corral's
    package is added, after the app's entries.  The venv's bin/ goes first
    on PATH, as activating it would do, for deploy commands it installed.
    """
    if python == sys.executable:
        return
    shim = run_dir / "corral-path"
    shim.mkdir(exist_ok=True)
    link = shim / "corral"
    if not link.exists():
        link.symlink_to(Path(__file__).resolve().parent, target_is_directory=True)
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([*parts, str(shim)])
    log.info("workers and deploy step run with %s, the app's own interpreter", python)
    venv = Path(python).parent.parent
    if (venv / "pyvenv.cfg").is_file():
        env.setdefault("VIRTUAL_ENV", str(venv))
        if "PATH" not in env:
            env["PATH"] = os.pathsep.join([str(venv / "bin"),
                                           os.environ.get("PATH", os.defpath)])
