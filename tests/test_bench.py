"""`corral bench` runs end to end and writes its table.  It only checks that
the run works; no benchmark figure is asserted (a timed test would be flaky)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.harness import ROOT, require_tool


def table_rows(text: str) -> list[list[str]]:
    """The data rows of every Markdown table in `text`, as lists of cells."""
    rows = []
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) > 2 and not set(cells[0]) <= {"-", ":"}:
            rows.append(cells)
    return rows


def test_quick_bench_writes_a_table_with_corral_and_gunicorn(tmp_path):
    require_tool("wrk")
    out = tmp_path / "results"
    result = subprocess.run(
        [sys.executable, "-m", "corral", "bench", "--quick", "--duration", "1",
         "--only", "corral,gunicorn", "--out", str(out)],
        capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    table = (out / "results.md").read_text()
    assert result.stdout == table  # the same table on stdout
    assert (out / "results.json").is_file()
    # Three cases (hello, /bench/time, /bench/db on SQLite), each with a row
    # per arrangement at 32 connections: the arrangement, connections, rps.
    rows = [row for row in table_rows(table) if row[0] in ("corral", "gunicorn")
            and row[1] == "32"]
    assert sorted(row[0] for row in rows) == ["corral"] * 3 + ["gunicorn"] * 3, table
    for row in rows:
        assert float(row[2].replace(",", "")) > 0, row
    # A point per line on stderr, as the run goes.
    assert result.stderr.count(" c=32: ") == 6, result.stderr
