"""``align select``: pick, among models that earlier stages evaluated, the one with the best metric.

    align select --candidates runs/eval_sft,runs/eval_dpo --metric mean_reward --output_dir runs/best
    align select --candidates runs/best_r1,runs/eval_r2 --baseline runs/best_r1 --min_gain 0.01 ...

Llama 3 (arXiv 2407.21783, section 4.1) starts each round from "the best models from the previous
round"; AFM's iTeC committee (arXiv 2407.21075, section 4.3.2) is "the latest and the best" models.
This stage makes that choice by a number: each candidate is a finished stage dir whose stage.json
summary holds ``--metric`` (an ``align eval`` stage: the model it evaluated; a trainer stage with
an eval set, or another select stage: the model it wrote). The best value wins (``--mode max``,
or ``min`` for a loss or a KL), ties going to the candidate listed first. With ``--baseline`` (a
candidate or another stage dir), the baseline's model is kept unless the best candidate beats it
by more than ``--min_gain``: a new round must earn its place.

The chosen model folder is linked into ``model/`` (hard links, a copy across file systems), so
later stages use ``${NAME.model}`` like any other; stage.json records every candidate's value,
the baseline and the choice, and ``align status`` shows the choice. Departure from the reports:
they choose with many benchmarks and human judgement; here one metric decides.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any, ClassVar, Literal

from align.core.config import BaseConfig, option, required
from align.core.errors import ConfigError
from align.core.registry import command
from align.core.stage_dir import Stage, read_stage, staging_dir


@dataclasses.dataclass
class SelectConfig(BaseConfig):
    run_control: ClassVar[tuple[str, ...]] = ("overwrite",)
    inputs: ClassVar[tuple[str, ...]] = ("candidates", "baseline")

    candidates: list[str] = required(
        "Finished stage dirs to choose among, comma-separated: eval stages (the model each"
        " evaluated), or stages that wrote model/ and report the metric."
    )
    metric: str = required("Key of the candidates' stage.json summary to compare (e.g. mean_reward of align eval).")
    output_dir: str = required("Stage directory: stage.json and model/ (the chosen model, linked).")
    mode: Literal["max", "min"] = option("max", "max: the highest value wins; min: the lowest (a loss, a KL).")
    baseline: str | None = option(
        None,
        "A stage dir whose model is kept unless a candidate beats it by more than min_gain"
        " (e.g. the best model so far).",
    )
    min_gain: float = option(0.0, "With baseline: how much better than the baseline the best candidate must be.")
    overwrite: bool = option(False, "Replace a finished stage in output_dir.")

    def validate(self) -> None:
        if not self.candidates:
            raise ConfigError("'candidates' needs at least one stage dir")
        if self.min_gain < 0:
            raise ConfigError(f"'min_gain' must be >= 0, got {self.min_gain}")
        if self.min_gain and not self.baseline:
            raise ConfigError("'min_gain' compares against 'baseline'; set baseline too")


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A finished stage: its dir, the model it stands for, and its value of the metric."""

    stage: str
    model: str
    value: float


def choose(values: list[float], mode: str = "max", baseline: float | None = None, min_gain: float = 0.0) -> int | None:
    """Index of the best of ``values`` (ties: the first), or None when ``baseline`` is given and the
    best does not beat it by more than ``min_gain`` (in ``mode``'s direction)."""
    sign = 1.0 if mode == "max" else -1.0
    best = max(range(len(values)), key=lambda i: (sign * values[i], -i))
    if baseline is not None and sign * (values[best] - baseline) <= min_gain:
        return None
    return best


def read_candidate(path: str, metric: str) -> Candidate:
    """The candidate in stage dir ``path``; a dir that is not a finished stage, or whose summary
    lacks a numeric ``metric``, is a ConfigError naming it and what it has."""
    record = read_stage(path)
    if record is None:
        raise ConfigError(f"candidate {path} is not a finished stage (no complete stage.json); run it first")
    summary = record.get("summary") or {}
    value = summary.get(metric)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        numeric = sorted(k for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        raise ConfigError(
            f"candidate {path} ({record.get('stage')} stage) has no numeric '{metric}' in its summary;"
            f" it has: {', '.join(numeric) or 'none'}"
        )
    model = (record.get("artifacts") or {}).get("model") or (record.get("config") or {}).get("model_name_or_path")
    if not model or not Path(model).is_dir():
        raise ConfigError(f"candidate {path}: its model {model!r} is not a model folder on disk")
    return Candidate(str(path), str(model), float(value))


def link_tree(source: Path, target: Path) -> None:
    """``target`` as a copy of folder ``source`` made of hard links (no bytes copied), or a real
    copy where links cannot be made (another file system)."""
    try:
        shutil.copytree(source, target, copy_function=os.link, dirs_exist_ok=True)
    except OSError:
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target, dirs_exist_ok=True)


def key_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    """``align status``: the stage chosen and its value of the metric."""
    return {"chosen": summary.get("chosen"), "chosen_value": summary.get(summary.get("metric", ""))}


@command(
    "select",
    SelectConfig,
    "Pick the best of earlier stages' models by a metric (best model so far, with a baseline).",
    order=28,
    artifacts=("model",),
    metrics=key_metrics,
)
def run_select(cfg: SelectConfig) -> dict[str, Any]:
    candidates = [read_candidate(path, cfg.metric) for path in cfg.candidates]
    base = read_candidate(cfg.baseline, cfg.metric) if cfg.baseline else None
    stage = Stage("select", cfg, cfg.output_dir)
    if not stage.prepare(overwrite=cfg.overwrite):
        return read_stage(cfg.output_dir)
    index = choose([c.value for c in candidates], cfg.mode, base.value if base else None, cfg.min_gain)
    chosen = candidates[index] if index is not None else base
    assert chosen is not None
    with staging_dir(stage.dir / "model") as tmp:
        link_tree(Path(chosen.model), tmp)
    summary = {
        "metric": cfg.metric,
        "mode": cfg.mode,
        cfg.metric: chosen.value,
        "chosen": Path(chosen.stage).name,
        "chosen_stage": chosen.stage,
        "chosen_model": chosen.model,
        "kept_baseline": index is None,
        "baseline": dataclasses.asdict(base) if base else None,
        "min_gain": cfg.min_gain,
        "candidates": [dataclasses.asdict(c) for c in candidates],
    }
    kept = " (the baseline: no candidate beat it by more than min_gain)" if index is None else ""
    print(f"select: {Path(chosen.stage).name} ({cfg.metric} {chosen.value:.4f}){kept} -> {stage.dir / 'model'}")
    return stage.finish(summary, {"model": str(stage.dir / "model")})


__all__ = ["SelectConfig", "run_select", "choose"]
