"""What a pool run shows: the markdown table (``pool.md``) and the plot (``pool.png``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .common import _human, percentile
from .jobs import PoolResult


def _fmt(v: float | None, unit: str = "s") -> str:
    return "-" if v is None else f"{v:.2f}{unit}"


def markdown_report(result: PoolResult) -> str:
    """The results as markdown: a table per phase, then the checks."""
    cfg = result.config
    env = result.env_bytes
    lines = [
        f"Pool: {cfg.nodes} nodes x {cfg.slots} slots, {cfg.jobs} jobs; workload scale {cfg.scale}: "
        f"{result.artifacts} packages, {_human(env)}"
        + (f"; faults: {', '.join(cfg.faults)}" if cfg.faults else "")
        + ("; node-local serve" if cfg.node_serve else "")
        + ("; squid in front of the site mirror" if cfg.squid else "")
        + (f"; jobs on python {cfg.worker_python}" if cfg.worker_python else "")
        + (f"; {cfg.users} Unix users per node store" if cfg.users > 1 else "")
        + (f"; upstream behind a {cfg.shaped} tbf-shaped link" if cfg.shaped else ""),
        "",
        "| phase | runs | exit 0 | upstream ÷ env | site mirror ÷ env | node fills (min-max) "
        "| node-store hits (min-max) | time-to-task p50 | p95 | max | agent ttt p50 | CPU/job p50 | wall |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, ph in result.phases.items():
        per = ph.per_node(cfg.nodes)
        used = sorted({r.node for r in ph.runs})
        fills = [per[i][0] for i in used] or [0]
        hits = [per[i][1] for i in used] or [0]
        ttt = ph.ttt()
        agent = [r.agent_time_to_task for r in ph.runs if r.agent_time_to_task is not None]
        cpu = [r.cpu for r in ph.runs]
        mirror = "-" if name == "baseline" else f"{ph.mirror_bytes / env:.2f}x"
        lines.append(
            f"| {name} | {len(ph.runs)} | {ph.ok} | {ph.upstream_bytes / env:.2f}x | {mirror} "
            f"| {min(fills)}-{max(fills)} | {min(hits)}-{max(hits)} "
            f"| {_fmt(percentile(ttt, 50))} | {_fmt(percentile(ttt, 95))} | {_fmt(max(ttt) if ttt else None)} "
            f"| {_fmt(percentile(agent, 50))} | {_fmt(percentile(cpu, 50))} | {ph.seconds:.1f}s |"
        )
    wn, single = result.phases.get("warm-nodes"), result.phases.get("single")
    if wn is not None and single is not None and wn.ttt() and single.ttt():
        ratio = percentile(wn.ttt(), 50) / percentile(single.ttt(), 50)  # type: ignore[operator]
        cpu_ratio = percentile([r.cpu for r in wn.runs], 50) / max(  # type: ignore[operator]
            1e-9, percentile([r.cpu for r in single.runs], 50) or 0
        )
        lines += [
            "",
            f"Warm nodes vs a single warm-node run: time-to-task p50 {ratio:.2f}x, "
            f"CPU per job p50 {cpu_ratio:.2f}x ({cfg.nodes * cfg.slots} slots share "
            f"{os.cpu_count()} CPU cores here).",
        ]
    for name, ph in result.phases.items():
        if ph.squid:
            lines += [
                "",
                f"squid ({name}): package requests by result {ph.squid}; the site mirror's "
                f"artifact requests {ph.mirror_requests}",
            ]
    notes = [n for ph in result.phases.values() for n in ph.notes] + result.notes
    for name, ph in result.phases.items():
        direct = ph.upstream_bytes - ph.upstream_via_mirror
        fell = sum(1 for r in ph.runs if r.tier("upstream"))
        if name != "baseline" and (direct or ph.mirror_refused):
            notes.append(
                f"{name}: the site mirror refused {ph.mirror_refused} request(s); {fell} job(s) "
                f"fetched {direct / env:.2f}x the environment from upstream directly"
            )
        failed = [r for r in ph.runs if r.rc != 0 and not r.evicted]
        for r in failed[:3]:
            why = (r.error or {}).get("message") or r.stderr_tail.strip().splitlines()[-1:] or "?"
            notes.append(f"{name}: job {r.job} on node {r.node} exit {r.rc}: {str(why)[:300]}")
    if notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in notes]
    lines += ["", "Checks:"] + [
        f"- [{'x' if ok else ' '}] {name}" + (f" ({detail})" if detail else "")
        for name, ok, detail in result.checks
    ]
    return "\n".join(lines) + "\n"


def plot(result: PoolResult, path: Path) -> Path | None:
    """A PNG: bytes per phase (upstream, site mirror) and the time-to-task distributions."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is missing (pip install -e '.[bench]'): no figure", file=sys.stderr)
        return None
    env = result.env_bytes
    names = list(result.phases)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    xs = range(len(names))
    up = [result.phases[n].upstream_bytes / env for n in names]
    mir = [result.phases[n].mirror_bytes / env if n != "baseline" else 0 for n in names]
    ax1.bar([x - 0.2 for x in xs], up, 0.4, label="upstream ÷ env")
    ax1.bar([x + 0.2 for x in xs], mir, 0.4, label="site mirror ÷ env")
    for x, v in zip(xs, up):
        ax1.annotate(f"{v:.2f}", (x - 0.2, v), ha="center", va="bottom", fontsize=8)
    ax1.set_xticks(list(xs), names, rotation=20)
    ax1.set_ylabel("bytes ÷ environment bytes")
    ax1.set_yscale("symlog", linthresh=1)
    ax1.set_title("Bytes moved per phase")
    ax1.legend()
    data = [result.phases[n].ttt() or [0.0] for n in names]
    ax2.boxplot(data, whis=(5, 95), showfliers=True)
    ax2.set_xticks([x + 1 for x in xs], names, rotation=20)
    ax2.set_ylabel("time-to-task (s): job start -> task start")
    ax2.set_title("Time-to-task (whiskers p5-p95)")
    cfg = result.config
    fig.suptitle(
        f"pixicache pool: {cfg.nodes} nodes x {cfg.slots} slots, {cfg.jobs} jobs, "
        f"scale {cfg.scale} ({_human(env)})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
