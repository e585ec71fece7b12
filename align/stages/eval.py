"""``align eval``: answer a prompt set with a policy and score the answers with ``--reward``.

    align eval --model_name_or_path runs/sft/model --dataset runs/demo/test.jsonl \\
        --reward rule:arithmetic --output_dir runs/eval-sft

Greedy by default (one answer per prompt); ``--num_samples K --temperature T`` samples K and
reports both the mean over all samples and ``best_of_k`` (pass@K for a 0/1 reward). Writes
``stage.json`` with ``mean_reward`` (for ``rule:arithmetic`` the exact-match accuracy),
``truncated_frac`` (the share of answers cut at ``max_tokens``, whose reward judges an unfinished
answer) and the engine used, and ``eval.jsonl`` with each prompt's response(s), reward and
finish reason(s). The quickstart's progress table is built from these stage.json files.
"""

from __future__ import annotations

import dataclasses
import json
from typing import ClassVar

from align.config import BaseConfig, option, required
from align.errors import ConfigError
from align.evaluation import RewardOptions, check_scorer_accepts, evaluate, load_prompts
from align.registry import command
from align.stage import Stage, atomic_write_text, read_stage
from sampling.base import SamplingParams
from sampling.engines import EngineOptions

RESULTS = "eval.jsonl"


@dataclasses.dataclass
class EvalConfig(RewardOptions, EngineOptions, BaseConfig):
    # Memory knobs that do not change the samples: a rerun with other values continues / is a no-op.
    run_control: ClassVar[tuple[str, ...]] = ("overwrite", "resume", "kv_cache_gb", "max_num_seqs", "kv_block_size", "threads", "enforce_eager", "gpu_memory_utilization", "tensor_parallel_size")
    inputs: ClassVar[tuple[str, ...]] = ("model_name_or_path", "dataset", "reward")

    model_name_or_path: str = required("Policy to evaluate: a Hugging Face model folder or Hub id.")
    dataset: str = required("Prompt set (e.g. the demo's test.jsonl); extra columns such as `answer` reach the scorer.")
    output_dir: str = required("Stage directory: stage.json and eval.jsonl (per-prompt results).")
    num_samples: int = option(1, "Answers per prompt: 1 = greedy; K > 1 samples K (set temperature > 0).")
    temperature: float = option(0.0, "0 = greedy; > 0 samples.")
    top_p: float = option(1.0, "Nucleus sampling threshold (sampled evaluation only).")
    max_tokens: int = option(32, "Longest generated answer, in tokens.")
    seed: int = option(0, "Sampling seed.")
    max_prompts: int | None = option(None, "Evaluate only the first N prompts.")
    overwrite: bool = option(False, "Replace a finished stage in output_dir.")

    def validate(self) -> None:
        self.validate_engine()
        if self.num_samples < 1:
            raise ConfigError(f"'num_samples' must be >= 1, got {self.num_samples}")
        if self.num_samples > 1 and self.temperature == 0:
            raise ConfigError(f"num_samples={self.num_samples} needs --temperature > 0 (greedy answers are all the same)")
        if self.temperature < 0 or self.max_tokens < 1:
            raise ConfigError("'temperature' must be >= 0 and 'max_tokens' >= 1")


@command("eval", EvalConfig, "Generate answers on a prompt set and score them (mean reward, per-prompt results).")
def run_eval(cfg: EvalConfig, engine=None) -> dict:
    """Run the stage; returns the stage record. ``engine`` reuses a live engine (it is not closed)."""
    rows = load_prompts(cfg.dataset, cfg.max_prompts)
    scorer = cfg.build_scorer()
    check_scorer_accepts(scorer, rows, cfg.dataset)
    stage = Stage("eval", cfg, cfg.output_dir)
    if not stage.prepare(overwrite=cfg.overwrite):
        return read_stage(cfg.output_dir)
    own_engine = engine is None
    if own_engine:
        engine = cfg.build_engine(cfg.model_name_or_path, seed=cfg.seed)
    params = SamplingParams(n=cfg.num_samples, temperature=cfg.temperature, top_p=cfg.top_p,
                            max_tokens=cfg.max_tokens, seed=cfg.seed)
    try:
        report = {**evaluate(engine, cfg.dataset, cfg.reward, params=params, scorer=scorer, rows=rows), "engine": engine.name}
    finally:
        if own_engine:
            engine.close()
    atomic_write_text(stage.dir / RESULTS, "".join(json.dumps(r) + "\n" for r in report.pop("results")))
    print(f"eval: mean reward {report['mean_reward']:.4f} on {report['num_prompts']} prompts")
    return stage.finish(report, {"results": str(stage.dir / RESULTS)})
