"""Live progress of a local run: a rich table on a terminal, one line per transition otherwise."""

from __future__ import annotations

import time

from rich.console import Console
from rich.live import Live
from rich.table import Table

STYLE = {
    "Pending": "dim",
    "Running": "cyan",
    "Succeeded": "green",
    "Failed": "red",
    "Skipped": "yellow",
    "Omitted": "dim",
    "Error": "red",
}


class Progress:
    def __init__(self, workflow_name: str, steps: list[str], console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.name = workflow_name
        self.rows = {s: {"phase": "Pending", "attempt": 0, "start": None, "end": None, "note": ""} for s in steps}
        self.live = (
            Live(self._table(), console=self.console, refresh_per_second=4, transient=False)
            if self.console.is_terminal
            else None
        )

    def __enter__(self):
        if self.live:
            self.live.__enter__()
        else:
            self.console.print(f"workflow {self.name}: {len(self.rows)} steps")
        return self

    def __exit__(self, *exc):
        if self.live:
            self.live.update(self._table())
            self.live.__exit__(*exc)

    def _elapsed(self, row) -> str:
        if row["start"] is None:
            return ""
        end = row["end"] or time.monotonic()
        return f"{end - row['start']:.1f}s"

    def _table(self) -> Table:
        t = Table(title=f"nmm run · {self.name}", expand=False)
        for col in ("step", "phase", "attempt", "time", "last log line"):
            t.add_column(col)
        for name, r in self.rows.items():
            t.add_row(
                name, f"[{STYLE.get(r['phase'], '')}]{r['phase']}", str(r["attempt"] or ""), self._elapsed(r), r["note"]
            )
        return t

    def update(self, step: str, phase: str | None = None, attempt: int | None = None, note: str | None = None) -> None:
        r = self.rows.setdefault(step, {"phase": "Pending", "attempt": 0, "start": None, "end": None, "note": ""})
        if phase and phase != r["phase"]:
            if phase == "Running" and r["start"] is None:
                r["start"] = time.monotonic()
            if phase in ("Succeeded", "Failed", "Error", "Skipped", "Omitted"):
                r["end"] = time.monotonic()
            r["phase"] = phase
            if not self.live:
                extra = f" (attempt {attempt})" if attempt and attempt > 1 else ""
                elapsed = f" in {self._elapsed(r)}" if r["end"] and r["start"] else ""
                self.console.print(f"  {step:<10} {phase}{extra}{elapsed}")
        if attempt is not None:
            r["attempt"] = attempt
        if note is not None:
            r["note"] = note
        if self.live:
            self.live.update(self._table())
