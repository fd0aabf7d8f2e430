"""The deploy step: a file or command run once per generation, before it
serves, with its output timestamped into the deploy log with its exit status.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import signal
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from corral.config import DeployStep

log = logging.getLogger("corral.error")


@dataclass
class DeployResult:
    ok: bool
    status: int | None  # exit status; None if it was stopped for its timeout
    seconds: float
    log: Path

    def describe(self) -> str:
        if self.status is None:
            return f"stopped after its {self.seconds:.0f} s timeout"
        return f"exit status {self.status} after {self.seconds:.1f} s"


def _stamp() -> str:
    return datetime.now().astimezone().isoformat(timespec="milliseconds")


async def run_deploy(step: DeployStep, root: Path, env: dict[str, str],
                     generation: int, app: str, run_as=None) -> DeployResult:
    """Run the deploy step to completion (or its timeout) and log it, as the
    user `run_as` (a config RunAs: [app] user) when given."""
    step.log.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with open(step.log, "a", encoding="utf-8", errors="replace") as out:
        def note(line: str) -> None:
            out.write(f"{_stamp()} {line}\n")
            out.flush()

        note(f"deploy step of {app} generation {generation} started: {shlex.join(step.argv)}")
        log.info("deploy step of %s started: %s (output in %s)", app,
                 shlex.join(step.argv), step.log)
        try:
            proc = await asyncio.create_subprocess_exec(
                *step.argv, cwd=root, env=env, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=run_as.preexec() if run_as is not None else None)
        except OSError as exc:
            note(f"deploy step could not start: {exc}")
            log.error("deploy step of %s could not start: %s", app, exc)
            return DeployResult(False, 127, time.monotonic() - started, step.log)

        async def copy_output() -> None:
            async for line in proc.stdout:
                note(line.decode("utf-8", "replace").rstrip("\n"))

        status: int | None
        try:
            await asyncio.wait_for(copy_output(), step.timeout)
            status = await proc.wait()
        except TimeoutError:
            # The whole process group: a deploy step may have started children.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await proc.wait()
            status = None
        except asyncio.CancelledError:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            raise
        result = DeployResult(status == 0, status, time.monotonic() - started, step.log)
        note(f"deploy step finished: {result.describe()}")
    if result.ok:
        log.info("deploy step of %s succeeded (%s)", app, result.describe())
    else:
        # What happens next is the pool's to say: the old generation serves
        # on, or (at the first start, or with [deploy] exclusive) the app
        # answers 503 until a restart succeeds.
        log.error("deploy step of %s FAILED (%s); output in %s", app, result.describe(),
                  step.log)
    return result
