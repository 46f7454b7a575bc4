"""The run report: where every byte came from, how long each phase took, what ran.

At the end of every ``pixicache install`` / ``pixicache run`` the agent writes
a human summary to stderr and ``pixicache-report.json`` to the working
directory (atomically: a temporary file renamed into place). It is what lets
an admin prove the cache works (a warm node shows every artifact under
``store`` and zero bytes from ``mirror``/``upstream``).

JSON schema (``"schema": "pixicache.report/1"``; fields may be added, none
removed or changed in meaning without a new schema value)::

    {
      "schema": "pixicache.report/1",
      "command": "run" | "install",
      "started": "2026-01-01T12:00:00Z",     # UTC, ISO 8601
      "seconds": 1.234,                       # wall time of the whole command
      "time_to_task": 0.21 | null,            # seconds from start until the task's first process
      "exit_code": 0,                         # what the agent exits with
      "host": {"name": "node01", "platform": "linux-64", "pid": 1234, "user": "alice"},
      "gpus": {"CUDA_VISIBLE_DEVICES": "0" | null, "_CONDOR_AssignedGPUs": "GPU-ab12" | null},
      "manifest": "/abs/pixi.toml", "lock": "/abs/pixi.lock",
      "environment": "default", "platform": "linux-64", "prefix": "/abs/.pixi/envs/default",
      "store": "/node/store", "package_cache": "/node/store/pkgs",
      "sources": ["mirror http://mirror:8080", "upstream"],
      "phases": {                             # seconds; null = the phase did not run
        "preflight": 0.01, "pixi_verify": null, "plan": 0.002,
        "fetch": 0.0, "install": 0.004, "task": 0.5
      },
      "artifacts": {"count": 121, "bytes": 3705969704},
      "tiers": {                              # always these four keys
        "store":    {"artifacts": 121, "bytes": 3705969704, "transferred": 0},
        "local":    {"artifacts": 0, "bytes": 0, "transferred": 0},
        "mirror":   {"artifacts": 0, "bytes": 0, "transferred": 0},
        "upstream": {"artifacts": 0, "bytes": 0, "transferred": 0}
      },                                      # bytes: artifact sizes; transferred: bytes moved this run
      "fetch": {...} | null,                  # FetchReport.to_json() (by_source, missing...)
      "installer": {"name": "rattler", "reason": "...", "changed": false,
                    "packages": 121, "seconds": 0.004, "notes": [...]} | null,
      "pixi": {"path": ..., "version": ..., "sha256": ..., "source": "pin"|"trusted",
               "archive_sha256": ...} | null,
      "pixi_reason": "why this Pixi (or none) was used",
      "preflight": {...} | null,              # PreflightReport.to_json()
      "task": {"name": "train", "args": [...], "runner": "native"|"pixi",
               "exit_code": 0, "steps": [...], "signal": null,
               "forwarded_signals": ["SIGTERM"], "seconds": 0.5, "notes": [...]} | null,
      "error": {"type": "FetchError", "message": "...", "exit_code": 3} | null,
      "notes": ["..."]
    }
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from pixicache.progress import human_bytes

__all__ = ["PHASES", "REPORT_NAME", "SCHEMA", "TIERS", "RunReport"]

SCHEMA = "pixicache.report/1"
REPORT_NAME = "pixicache-report.json"
PHASES = ("preflight", "pixi_verify", "plan", "fetch", "install", "task")
TIERS = ("store", "local", "mirror", "upstream")


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _user() -> str | None:
    try:
        return getpass.getuser()
    except (KeyError, OSError, ImportError):  # no passwd entry (containers): not worth failing for
        return None


class RunReport:
    """Collects what one agent command did; see the module doc for the JSON.

    Args:
        command: ``"run"`` or ``"install"``.
        path: where :meth:`write` puts the JSON (default ``./pixicache-report.json``);
            ``None`` disables writing it.
    """

    def __init__(self, command: str, path: str | os.PathLike[str] | None = REPORT_NAME) -> None:
        self.command = command
        self.path = None if path is None else Path(path)
        self.started = time.time()
        self.t0 = time.monotonic()
        self.data: dict[str, Any] = {
            "schema": SCHEMA,
            "command": command,
            "started": _utc(self.started),
            "seconds": None,
            "time_to_task": None,
            "exit_code": None,
            "host": {
                "name": os.uname().nodename,  # gethostname(2) is uname's nodename
                "platform": None,
                "pid": os.getpid(),
                "user": _user(),
            },
            "gpus": {
                "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "_CONDOR_AssignedGPUs": os.environ.get("_CONDOR_AssignedGPUs"),  # noqa: SIM112 - HTCondor's name
            },
            "manifest": None,
            "lock": None,
            "environment": None,
            "platform": None,
            "prefix": None,
            "store": None,
            "package_cache": None,
            "sources": [],
            "phases": {p: None for p in PHASES},
            "artifacts": {"count": 0, "bytes": 0},
            "tiers": {t: {"artifacts": 0, "bytes": 0, "transferred": 0} for t in TIERS},
            "fetch": None,
            "installer": None,
            "pixi": None,
            "pixi_reason": None,
            "preflight": None,
            "task": None,
            "error": None,
            "notes": [],
        }

    # -- recording ------------------------------------------------------------------------
    def set(self, **fields: Any) -> None:
        """Set top-level fields (``environment=...``, ``prefix=...``)."""
        for key, value in fields.items():
            self.data[key] = str(value) if isinstance(value, Path) else value

    def note(self, text: str) -> None:
        if text not in self.data["notes"]:
            self.data["notes"].append(text)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a phase (added to what it already has; recorded even on error)."""
        if name not in self.data["phases"]:
            raise ValueError(f"unknown phase {name!r} (phases: {', '.join(PHASES)})")
        t = time.monotonic()
        try:
            yield
        finally:
            self.add_time(name, time.monotonic() - t)

    def add_time(self, name: str, seconds: float) -> None:
        prev = self.data["phases"].get(name) or 0.0
        self.data["phases"][name] = round(prev + seconds, 6)

    def record_host_platform(self, platform: str) -> None:
        """The platform this node is (``host.platform``)."""
        self.data["host"]["platform"] = platform

    def record_preflight(self, preflight: Any) -> None:
        """A :class:`~pixicache.agent.preflight.PreflightReport`; its warnings become notes."""
        self.data["preflight"] = preflight.to_json()
        for check in preflight.warnings:
            self.note(f"preflight warning: {check.detail}")

    def record_artifacts(self, artifacts: list[Any]) -> None:
        self.data["artifacts"] = {
            "count": len(artifacts),
            "bytes": sum(a.size or 0 for a in artifacts),
        }

    def record_fetch(self, fetch_report: Any) -> None:
        """Record a :class:`~pixicache.fetch.FetchReport` (tiers from ``by_tier()``)."""
        self.data["fetch"] = fetch_report.to_json()
        for line in fetch_report.failover():
            self.note(line)
        for tier, slot in fetch_report.by_tier().items():
            dest = self.data["tiers"].setdefault(
                tier, {"artifacts": 0, "bytes": 0, "transferred": 0}
            )
            for key in ("artifacts", "bytes", "transferred"):
                dest[key] += int(slot.get(key, 0))

    def record_store_hits(self, artifacts: list[Any]) -> None:
        """Every artifact was already in the node store (no fetch was needed)."""
        slot = self.data["tiers"]["store"]
        slot["artifacts"] += len(artifacts)
        slot["bytes"] += sum(a.size or 0 for a in artifacts)

    def record_installer(self, name: str, reason: str, result: Any = None) -> None:
        entry: dict[str, Any] = {"name": name, "reason": reason}
        if result is not None:
            entry.update(
                changed=result.changed,
                packages=result.packages,
                seconds=round(result.seconds, 6),
                notes=list(result.notes),
            )
        self.data["installer"] = entry

    def record_pixi(self, pixi: Any, reason: str) -> None:
        self.data["pixi"] = pixi.to_json() if pixi is not None else None
        self.data["pixi_reason"] = reason

    def record_task(self, outcome: Any, args: list[str]) -> None:
        data = outcome.to_json()
        data["args"] = list(args)
        self.data["task"] = data

    def record_error(self, exc: BaseException, exit_code: int) -> None:
        self.data["error"] = {
            "type": type(exc).__name__,
            "message": str(exc),
            "exit_code": exit_code,
        }

    def finish(self, exit_code: int) -> None:
        self.data["exit_code"] = exit_code
        self.data["seconds"] = round(self.elapsed(), 6)

    def elapsed(self) -> float:
        """Seconds since the report (the command) started."""
        return time.monotonic() - self.t0

    def mark_task_start(self) -> None:
        """Record ``time_to_task``: when the task's first process is about to start."""
        self.data["time_to_task"] = round(self.elapsed(), 6)

    # -- output ---------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return self.data

    def write(self, path: str | os.PathLike[str] | None = None) -> Path | None:
        """Write the JSON atomically (temporary file + fsync + rename); returns the path.

        A report that cannot be written is noted on stderr, never fatal.
        """
        target = Path(path) if path is not None else self.path
        if target is None:
            return None
        target = target.absolute()
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(self.data, fh, indent=2)
                fh.write("\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            sys.stderr.write(
                f"pixicache: cannot write the report {target}: {exc.strerror or exc}\n"
            )
            return None
        return target

    def summary(self) -> str:
        """The human summary (a few lines) printed on stderr."""
        d = self.data
        lines = [
            f"pixicache {d['command']}: exit {d['exit_code']} after {d['seconds'] or 0:.2f} s "
            f"on {d['host']['name']} ({d['environment'] or '?'} / {d['platform'] or '?'})"
        ]
        phases = [f"{p} {v:.3f}s" for p, v in d["phases"].items() if v is not None]
        if phases:
            lines.append("  phases: " + ", ".join(phases))
        art = d["artifacts"]
        if art["count"]:
            parts = []
            for tier in TIERS:
                slot = d["tiers"].get(tier, {})
                if slot.get("artifacts"):
                    parts.append(f"{tier} {slot['artifacts']} ({human_bytes(slot['bytes'])})")
            lines.append(
                f"  artifacts: {art['count']} ({human_bytes(art['bytes'])}): "
                + (", ".join(parts) or "none fetched")
            )
        inst = d["installer"]
        if inst:
            state = "" if "changed" not in inst else (
                "; the prefix was updated" if inst["changed"] else "; the prefix was already up to date"
            )
            lines.append(f"  installer: {inst['reason']}{state}")
        if d["pixi"]:
            lines.append(f"  pixi: {d['pixi']['version']} sha256 {d['pixi']['sha256']}")
        gpus = {k: v for k, v in d["gpus"].items() if v is not None}
        if gpus:
            lines.append("  gpus: " + ", ".join(f"{k}={v}" for k, v in gpus.items()))
        task = d["task"]
        if task:
            fwd = (
                f", forwarded {', '.join(task['forwarded_signals'])}"
                if task["forwarded_signals"]
                else ""
            )
            lines.append(f"  task: {task['name']} ({task['runner']}) exit {task['exit_code']}{fwd}")
        if d["error"]:
            lines.append(f"  error: {d['error']['type']}: {d['error']['message'].splitlines()[0]}")
        for note in d["notes"]:
            lines.append(f"  note: {note}")
        if self.path is not None:
            lines.append(f"  report: {self.path}")
        return "\n".join(lines)

    def emit(self, stream: TextIO | None = None) -> None:
        """Write the JSON file and print the summary to ``stream`` (stderr)."""
        written = self.write()
        if written is None:
            self.path = None
        out = stream or sys.stderr
        out.write(self.summary() + "\n")
        out.flush()
