"""``align eval``: answer a prompt set with a policy and score the answers with ``--reward``.

    align eval --model_name_or_path runs/sft/model --dataset runs/demo/test.jsonl \\
        --reward rule:arithmetic --output_dir runs/eval-sft

Greedy by default (one answer per prompt); ``--num_samples K --temperature T`` samples K and
reports both the mean over all samples and ``best_of_k`` (pass@K for a 0/1 reward). Writes
``stage.json`` with ``mean_reward`` (for ``rule:arithmetic`` the exact-match accuracy),
``truncated_frac`` (the share of answers cut at ``max_tokens``, whose reward judges an unfinished
answer) and the engine used, and ``eval.jsonl`` with each prompt's response(s), reward and
finish reason(s). The quickstart's progress table is built from these stage.json files.

Beside the reward (``align.training.text_metrics``): ``--judges`` scores the same answers with further
scorers, each reported on its own (``judge_means``; e.g. a second judge that plays no part in
training, or the reward model a policy was optimized against); every run reports the answers'
``mean_length`` (tokens) and ``distinct_2``; ``--reference_model`` adds ``reference_nll``, the
answers' per-token NLL under that model (e.g. the base), so a gain that comes with degenerate text
shows.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar

from align.core.config import BaseConfig, option, required
from align.core.errors import ConfigError
from align.core.registry import command
from align.core.stage_dir import Stage, atomic_write_text, read_stage
from align.training.evaluation import RewardOptions, check_scorer_accepts, evaluate, load_prompts
from reward.rules import RULES
from reward.scorers import build_scorer, check_finite
from sampling.base import SamplingParams, Workload
from sampling.engines import EngineOptions, cpu_threads

RESULTS = "eval.jsonl"


@dataclasses.dataclass
class EvalConfig(RewardOptions, EngineOptions, BaseConfig):
    # Memory knobs that do not change the samples: a rerun with other values continues / is a no-op.
    run_control: ClassVar[tuple[str, ...]] = (
        "overwrite",
        "resume",
        "kv_cache_gb",
        "max_num_seqs",
        "kv_block_size",
        "threads",
        "enforce_eager",
        "gpu_memory_utilization",
        "tensor_parallel_size",
    )
    inputs: ClassVar[tuple[str, ...]] = ("model_name_or_path", "dataset", "reward", "judges", "reference_model")

    model_name_or_path: str = required("Policy to evaluate: a Hugging Face model folder or Hub id.")
    dataset: str = required(
        "Prompt set (e.g. the demo's test.jsonl); extra columns such as `answer` reach the scorer."
    )
    output_dir: str = required("Stage directory: stage.json and eval.jsonl (per-prompt results).")
    num_samples: int = option(1, "Answers per prompt: 1 = greedy; K > 1 samples K (set temperature > 0).")
    temperature: float = option(0.0, "0 = greedy; > 0 samples.")
    top_p: float = option(1.0, "Nucleus sampling threshold (sampled evaluation only).")
    max_tokens: int = option(32, "Longest generated answer, in tokens.")
    seed: int = option(0, "Sampling seed.")
    max_prompts: int | None = option(None, "Evaluate only the first N prompts.")
    overwrite: bool = option(False, "Replace a finished stage in output_dir.")
    judges: list[str] = option(
        [],
        "Further scorers (same specs as --reward), each reported on its own in judge_means and per answer:"
        " e.g. a second judge, or the reward model a policy was trained against.",
        names=RULES,
    )
    reference_model: str | None = option(
        None,
        "A causal LM (e.g. the base model) whose mean per-token NLL of the answers is"
        " reported as reference_nll: it rises when answers drift from text the reference finds likely.",
    )

    def validate(self) -> None:
        self.validate_engine()
        if self.num_samples < 1:
            raise ConfigError(f"'num_samples' must be >= 1, got {self.num_samples}")
        if self.num_samples > 1 and self.temperature == 0:
            raise ConfigError(
                f"num_samples={self.num_samples} needs --temperature > 0 (greedy answers are all the same)"
            )
        if self.temperature < 0 or self.max_tokens < 1:
            raise ConfigError("'temperature' must be >= 0 and 'max_tokens' >= 1")


def text_report(cfg: EvalConfig, rows: list[dict], results: list[dict], judges: dict) -> dict:
    """Judges' means (their per-answer scores added to ``results`` in place), length, distinct-2
    and the reference NLL of the answers (``align.training.text_metrics``)."""
    from align.training.evaluation import columns, prompt_text
    from align.training.text_metrics import distinct_n, reference_nll

    answers = [r.get("responses") or [r["response"]] for r in results]
    flat_rows = [row for row, a in zip(rows, answers) for _ in a]
    flat = [text for a in answers for text in a]
    report: dict = {"mean_length": results_length(results), "distinct_2": distinct_n(flat)}
    means = {}
    for spec, judge in judges.items():
        scores = judge.score([prompt_text(r["prompt"]) for r in flat_rows], flat, [columns(r) for r in flat_rows])
        check_finite(scores, [r["prompt_id"] for r in flat_rows], spec)
        means[spec] = sum(scores) / len(scores)
        it = iter(scores)
        for result, a in zip(results, answers):
            result.setdefault("judges", {})[spec] = [next(it) for _ in a] if "responses" in result else next(it)
    if means:
        report["judge_means"] = means
    if cfg.reference_model:
        report["reference_nll"] = reference_nll(
            cfg.reference_model, [r["prompt"] for r in flat_rows], flat, cfg.system_prompt
        )
    return report


def results_length(results: list[dict]) -> float:
    """Mean response tokens per answer (``num_tokens`` recorded by ``evaluate``)."""
    counts = [n for r in results for n in (r.get("num_tokens_list") or [r["num_tokens"]])]
    return sum(counts) / len(counts)


def short_spec(spec: str) -> str:
    """A scorer spec as a column name: ``rule:vader`` -> vader, ``model:runs/x/rm/model`` -> rm
    (the stage that trained it), ``pkg.mod:fn`` -> fn."""
    kind, _, rest = spec.partition(":")
    if kind == "model":
        parts = Path(rest).parts
        return parts[-2] if len(parts) > 1 and parts[-1] == "model" else Path(rest).name
    return rest or kind


def key_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    """``align status``: the reward, each judge's mean, and the text checks when a reference was given."""
    out = {
        "held_out": summary.get("mean_reward"),
        **{short_spec(k): v for k, v in (summary.get("judge_means") or {}).items()},
    }
    if "reference_nll" in summary:
        out.update(
            {
                "length": summary.get("mean_length"),
                "distinct_2": summary.get("distinct_2"),
                "ref_nll": summary.get("reference_nll"),
            }
        )
    return out


@command(
    "eval",
    EvalConfig,
    "Generate answers on a prompt set and score them (mean reward, per-prompt results).",
    order=22,
    metrics=key_metrics,
)
def run_eval(cfg: EvalConfig, engine=None) -> dict:
    """Run the stage; returns the stage record. ``engine`` reuses a live engine (it is not closed)."""
    rows = load_prompts(cfg.dataset, cfg.max_prompts)
    scorer = cfg.build_scorer()
    check_scorer_accepts(scorer, rows, cfg.dataset)
    judges = {spec: build_scorer(spec) for spec in cfg.judges}
    for judge in judges.values():
        check_scorer_accepts(judge, rows, cfg.dataset)
    stage = Stage("eval", cfg, cfg.output_dir)
    if not stage.prepare(overwrite=cfg.overwrite):
        return read_stage(cfg.output_dir)
    own_engine = engine is None
    if own_engine:
        work = Workload([r["prompt"] for r in rows], cfg.num_samples, cfg.max_tokens)
        engine = cfg.build_engine(cfg.model_name_or_path, seed=cfg.seed, work=work)
    params = SamplingParams(
        n=cfg.num_samples, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens, seed=cfg.seed
    )
    try:
        report = {
            **evaluate(engine, cfg.dataset, cfg.reward, params=params, scorer=scorer, rows=rows),
            "engine": engine.name,
            "sampler": getattr(engine, "sampler", engine.name),  # align's CPU sampler or the engine's own
            "threads": cpu_threads(engine),
            "kv_cache_gb": getattr(engine, "kv_cache_gb", None),
        }
    finally:
        if own_engine:
            engine.close()
    results = report.pop("results")
    report.update(text_report(cfg, rows, results, judges))
    atomic_write_text(stage.dir / RESULTS, "".join(json.dumps(r) + "\n" for r in results))
    extra = "".join(f", {k} {v:.4f}" for k, v in report.get("judge_means", {}).items())
    print(f"eval: mean reward {report['mean_reward']:.4f} on {report['num_prompts']} prompts{extra}")
    return stage.finish(report, {"results": str(stage.dir / RESULTS)})
