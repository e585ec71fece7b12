"""What a workdir holds: ``align status W`` (a table, or ``--json``) and ``align report W`` (PNGs + report.md).

Both read only files: ``<workdir>/run.json`` (written by ``align run``: the recipe, its profile and
``--set`` values, each stage's status in the last run), each stage's stage.json and metrics.jsonl,
and the workdir lock (a live holder means a run is going on). The recipe named in run.json (or,
when that path is gone, the file at the same place relative to the workdir: a moved checkout) is
loaded again to tell ``done`` from ``stale`` (config or inputs changed since, or an upstream stage
reruns), exactly as ``align run --dry-run`` would; when it cannot be, finished stages show as
``done`` with the reason they were not checked.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from align.core.errors import AlignError, ConfigError
from align.core.stage_dir import METRICS_FILE, read_stage
from align.pipeline.plan import Pipeline, commands
from align.pipeline.runner import RUN_FILE, holder


def key_metrics(kind: str, record: dict[str, Any] | None) -> dict[str, Any]:
    """The key figures of a stage of ``kind``, read from its stage.json summary as its command declares
    (``@command(..., metrics=...)``); ``held_out`` is the held-out score (for the demo's
    rule:arithmetic, exact match) that the progress table follows."""
    registry = commands()
    if not record or kind not in registry:
        return {}
    found = registry[kind].key_metrics(record.get("summary") or {})
    return {k: v for k, v in found.items() if v is not None}


def workdir_status(workdir: str | Path) -> list[dict[str, Any]]:
    """One dict per stage: name, kind, status, why, metrics, duration_s, finished_at, dir."""
    workdir = Path(workdir)
    run = _read_run(workdir)
    live = holder(workdir)
    plan, unchecked = _plan(run, workdir)
    rows = []
    for name, entry in run["stages"].items():
        record = read_stage(workdir / name)
        status, why = _status(entry, plan.get(name), record, live)
        if status == "done" and name not in plan:
            why = unchecked
        rows.append(
            {
                "name": name,
                "kind": entry.get("kind"),
                "status": status,
                "why": why,
                "metrics": key_metrics(entry.get("kind", ""), record),
                "duration_s": (record or {}).get("duration_s", entry.get("duration_s")),
                "finished_at": (record or {}).get("finished_at"),
                "dir": str(workdir / name),
            }
        )
    return rows


def _read_run(workdir: Path) -> dict[str, Any]:
    path = workdir / RUN_FILE
    if not path.is_file():
        raise ConfigError(f"{workdir} has no {RUN_FILE}: it is not the workdir of an `align run` (or nothing ran yet)")
    return json.loads(path.read_text())


def recipe_path(run: dict[str, Any], workdir: Path) -> Path | None:
    """The recipe file of the run recorded in run.json: its recorded path, else the same place
    relative to the workdir (a checkout moved or cloned elsewhere); None when neither is there."""
    for candidate in (Path(run["recipe"]), workdir / run.get("recipe_from_workdir", "")):
        if candidate.is_file():
            return candidate
    return None


def _plan(run: dict[str, Any], workdir: Path) -> tuple[dict[str, dict[str, Any]], str]:
    """The dry-run plan of the recorded recipe, or ({}, why not) when it can no longer be loaded."""
    path = recipe_path(run, workdir)
    if path is None:
        return {}, f"not checked for changes: recipe {run['recipe']} not found"
    # Plan as the run did: from its working directory with its spelling of the workdir (stage configs
    # record paths as spelled), when that is still this folder; else with the workdir as given here.
    cwd, spelled = Path(run.get("cwd") or "."), run.get("workdir") or str(workdir)
    same = (cwd / spelled).resolve() == workdir.resolve()
    try:
        with contextlib.chdir(cwd if same else Path.cwd()):
            recipe = Pipeline.load(
                path.resolve(),
                profile=run.get("profile"),
                sets=run.get("sets") or [],
                workdir=spelled if same else str(workdir),
            )
            return {row["name"]: row for row in recipe.plan()}, ""
    except AlignError as err:
        return {}, f"not checked for changes: {err}"


def _status(
    entry: dict[str, Any], plan: dict[str, Any] | None, record: dict[str, Any] | None, live: dict[str, Any] | None
) -> tuple[str, str]:
    recorded = entry.get("status", "pending")
    if recorded == "running" and live is not None:
        return "running", f"pid {live.get('pid')} on {live.get('host')}"
    if recorded == "failed":
        return "failed", f"exit {entry.get('exit_code')}; see {entry.get('log')}"
    if record is not None:
        if plan is None or plan["action"] == "skip":
            return "done", ""
        return "stale", plan["reason"]
    if recorded == "interrupted" or (plan or {}).get("state") == "incomplete":
        return "incomplete", "resumes on the next run"
    return "pending", ""


def format_metrics(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


def status_table(rows: list[dict[str, Any]], title: str):
    from rich.table import Table

    table = Table(title=title)
    for column in ("stage", "kind", "status", "key metric", "duration"):
        table.add_column(column, justify="right" if column == "duration" else "left")
    for row in rows:
        status = row["status"] + (f" ({row['why']})" if row["why"] else "")
        duration = f"{row['duration_s']:.0f}s" if isinstance(row["duration_s"], (int, float)) else ""
        table.add_row(row["name"], row["kind"] or "", status, format_metrics(row["metrics"]), duration)
    return table


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def write_report(workdir: str | Path) -> dict[str, str]:
    """Write ``<workdir>/report/``: heldout.png, rewards.png (if online stages ran) and report.md."""
    workdir = Path(workdir)
    rows = workdir_status(workdir)
    out = workdir / "report"
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}
    held = [(r["name"], r["metrics"]["held_out"]) for r in rows if "held_out" in r["metrics"]]
    if held:
        _bar_chart(held, out / "heldout.png", "held-out score after each stage")
        written["heldout"] = str(out / "heldout.png")
    curves = {r["name"]: _curve(workdir / r["name"], "reward_mean") for r in rows if r["kind"] == "rlhf"}
    curves = {k: v for k, v in curves.items() if v}
    if curves:
        _line_chart(curves, out / "rewards.png", "training reward per iteration (online stages)")
        written["rewards"] = str(out / "rewards.png")
    monitors = {r["name"]: _monitor_points(workdir / r["name"]) for r in rows if r["kind"] == "rlhf"}
    for name, points in monitors.items():
        if points:
            path = out / f"overoptimization_{name}.png"
            _kl_chart(points, path, f"{name}: held-out scores vs KL to the reference")
            written[f"overoptimization_{name}"] = str(path)
    lines = [f"# Report: {workdir}", "", "| stage | kind | status | key metric | duration |", "|---|---|---|---|---|"]
    for r in rows:
        duration = f"{r['duration_s']:.0f}s" if isinstance(r["duration_s"], (int, float)) else ""
        status = r["status"] + (f" ({r['why']})" if r["why"] else "")
        lines.append(f"| {r['name']} | {r['kind']} | {status} | {format_metrics(r['metrics'])} | {duration} |")
    if held:
        first, last = held[0], held[-1]
        lines += [
            "",
            f"Held-out score: {first[1]:.3f} after {first[0]} -> {last[1]:.3f} after {last[0]}"
            f" ({(last[1] - first[1]) * 100:+.1f} points).",
        ]
    for name, points in monitors.items():
        if points:
            lines += ["", *monitor_table(name, points)]
    lines += [""] + [f"![{k}]({Path(v).name})" for k, v in written.items()]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    written["markdown"] = str(out / "report.md")
    return written


def _monitor_points(stage_dir: Path) -> list[dict[str, Any]]:
    from align.rl.monitor import MONITOR_FILE, read_rows

    return read_rows(stage_dir / MONITOR_FILE)


def monitor_table(name: str, points: list[dict[str, Any]]) -> list[str]:
    """report.md's table of an rlhf stage's monitor: per point the KL and every score."""
    judges = list(points[0]["judges"])
    lines = [
        f"Over-optimization monitor of {name} (held-out prompts, one sampled answer each):",
        "",
        "| iteration | KL | reward (trained on) | " + " | ".join(judges) + " |",
        "|---|---|---|" + "---|" * len(judges),
    ]
    for p in points:
        lines.append(
            f"| {p['step']} | {p['kl']:.2f} | {p['reward']:.3f} | "
            + " | ".join(f"{p['judges'][j]:.3f}" for j in judges)
            + " |"
        )
    return lines


def _kl_chart(points: list[dict[str, Any]], path: Path, title: str) -> None:
    from align.rl.monitor import overoptimization_series
    from align.training.plot import draw

    draw(
        {k: [list(p) for p in v] for k, v in overoptimization_series(points).items()},
        str(path),
        title,
        x_label="KL to the reference (nats)",
    )


def _curve(stage_dir: Path, key: str) -> list[tuple[float, float]]:
    path = stage_dir / METRICS_FILE
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r["step"], r[key]) for r in rows if key in r and "step" in r]


def _bar_chart(points: list[tuple[str, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(points)), 3.5))
    ax.bar([p[0] for p in points], [p[1] for p in points], color="tab:blue")
    for i, (_, value) in enumerate(points):
        ax.text(i, value, f"{value:.2f}", ha="center", va="bottom")
    ax.set_ylabel("held-out score")
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _line_chart(curves: dict[str, list[tuple[float, float]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, points in curves.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], label=name)
    ax.set_xlabel("iteration")
    ax.set_ylabel("reward_mean")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
