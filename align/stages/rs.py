"""``align rs``: rejection sampling. Prompts -> K candidates -> rewards -> selection -> dataset.

    align rs --config configs/demo_rs.yaml --model_name_or_path runs/sft/model \\
        --dataset runs/demo/prompts.jsonl --output_dir runs/rs

Llama 2/3 ran it every round (sample K per prompt from the latest policy, keep the best by the
reward model, fine-tune on it); Qwen2 used it for math with a correctness rule. ``--select``
picks what is kept (``sampling.select``): ``best`` -> SFT rows, ``pairs`` -> preference pairs,
``all`` -> every scored candidate.

Committee (AFM's iTeC, Gunter et al. 2024, sec. 5.2): ``--model_name_or_path A,B,...`` (a YAML
list) samples K candidates per prompt from each member and selects across all of them: ``best``
keeps the best response per prompt over the whole committee (committee distillation), ``pairs``
draws chosen and rejected from different members where it can (iTeC's new preference pairs, the
scorer standing in for the annotators). Every candidate and row records its ``model`` (the path
as given); stage.json's ``wins`` counts the rows each member supplied (for pairs, the chosen
side). Member ``m``'s candidates are numbered ``m*K .. m*K+K-1``, so ties go to the member listed
first: list the model you prefer on ties first. Members share the seeds (prompt ``i``: ``seed +
i``), so a model listed twice is refused. One engine at a time: a member is loaded, samples every
prompt, and is freed before the next one loads, so a committee needs one model's memory.

Output in DIR:
  data/             the selected rows, a ``datasets`` folder (``load_from_disk``; also accepted
                    as ``--dataset`` by later stages) in TRL's conversational formats, each row with
                    its ``prompt_id`` (and ``candidate_index`` / rewards)
  candidates.jsonl  every candidate: prompt_id, candidate_index, text, reward, num_tokens,
                    finish_reason, duplicate_of (the earlier identical candidate, if any)
  stage.json        prompts, candidates, kept rows, mean/max reward, the share of candidates cut
                    at max_tokens (truncated_frac), tokens/s, the engine used (written last)
  metrics.jsonl     one row per shard

Crash safety: prompts are processed in shards of ``shard_size``; each finished shard of each
member (candidates and rewards) is written atomically to DIR/shards/. Rerunning the same command
after a crash or kill continues after the last complete shard (DIR/shards/manifest.json records
the config and the input fingerprints; another config or a changed input there fails unless
``--overwrite``). The vLLM engine seeds prompt ``i`` with ``seed + i``, so the resumed result is
the one an uninterrupted run gives. A shard file that is not whole JSON (cut short after it was
written: a partial copy, a disk that lost blocks) is sampled again, with a warning. When every shard is
done, data/ and candidates.jsonl are written, then stage.json, then shards/ is removed; a rerun
of a finished stage is a no-op. SIGTERM/SIGUSR1 stop the run after the current shard is written
(exit code 3, ``align.core.preempt``); the rerun continues from there.

Scale-out (``--shard I/N``, ``--merge``): ``--shard I/N`` (I from 0) samples only the prompts
whose id hashes to part I of N (a stable hash of the prompt id, not its position: adding prompts
moves no other prompt to another part), into a normal stage dir; prompt ``i`` keeps its seed
``seed + i``, so its candidates do not depend on the part it lands in. ``--merge D0,D1,...`` with
the same config as the parts (and no ``--shard``) checks that they come from that config and
cover every part exactly once, then writes into ``--output_dir`` the output the unsharded run
gives: the same data/ rows and candidates.jsonl, in the same order, and the same stage identity
(a later unsharded run with that config there is a no-op). With the transformers engine this
needs ``--batch_size 1`` (it seeds per batch: at 1, per prompt), which ``--shard`` checks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

from align.core import preempt
from align.core.config import BaseConfig, option, required
from align.core.errors import ConfigError, DataError
from align.core.registry import command
from align.core.stage_dir import (
    SHARD_MANIFEST,
    Stage,
    atomic_write_json,
    atomic_write_text,
    read_stage,
    shard_files,
    staging_dir,
)
from align.training.evaluation import (
    RewardOptions,
    check_scorer_accepts,
    load_prompts,
    score_candidates,
    truncated_fraction,
)
from sampling.base import Engine, SamplingParams, Workload
from sampling.engines import EngineOptions, cpu_threads
from sampling.select import STRATEGIES, Scored, SelectOptions, dedupe
from sampling.speed import describe, generation_speed

SHARDS = "shards"
CANDIDATES = "candidates.jsonl"


@dataclasses.dataclass
class RSConfig(RewardOptions, EngineOptions, BaseConfig):
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
        "merge",
    )
    inputs: ClassVar[tuple[str, ...]] = ("model_name_or_path", "dataset", "reward")
    one_or_many: ClassVar[tuple[str, ...]] = ("model_name_or_path",)

    model_name_or_path: list[str] = required(
        "Policy to sample from: a Hugging Face model folder or Hub id (e.g. the SFT stage's model/); several"
        " (comma-separated, or a YAML list) sample as a committee, one engine at a time, selecting across all of them."
    )
    dataset: str = required(
        "Prompts (TRL prompt-only, messages, ShareGPT or Alpaca); extra columns such as `answer` reach the scorer."
    )
    output_dir: str = required("Stage directory: data/, candidates.jsonl, stage.json, metrics.jsonl.")
    num_samples: int = option(8, "K: candidates sampled per prompt.")
    max_tokens: int = option(64, "Longest generated response, in tokens.")
    temperature: float = option(1.0, "Sampling temperature (0 = greedy, which makes the K samples identical).")
    top_p: float = option(1.0, "Nucleus sampling: keep the smallest token set with this much probability.")
    top_k: int = option(0, "Sample among the k most likely tokens (0 = off).")
    seed: int = option(
        0,
        "Sampling seed: prompt i has the seed key seed + i (hashed to its own block of sample streams), so reruns and any sharding reproduce.",
    )
    select: str = option(
        "best",
        "Selection strategy: best (best-of-K SFT rows), pairs (best vs worst preference rows), all (every candidate),"
        " bradley_terry (two candidates labelled by a noisy annotator: the scorer with --tau).",
        choices=STRATEGIES,
    )
    tau: float = option(
        0.0,
        "bradley_terry: annotator noise; the first candidate is chosen with probability sigmoid((r_a - r_b) / tau)"
        " (0: always the higher reward). The draw is seeded by --seed and the prompt id.",
    )
    min_margin: float = option(
        0.0, "pairs: keep a pair only if chosen - rejected reward >= this (ties are always skipped)."
    )
    min_reward: float | None = option(
        None, "best: drop prompts whose best reward is below this (e.g. 1.0: only correct answers)."
    )
    max_prompts: int | None = option(None, "Use only the first N prompts of the dataset.")
    shard_size: int = option(256, "Prompts per shard: the unit written to disk as it completes (and resumed from).")
    overwrite: bool = option(False, "Replace a finished or unfinished stage in output_dir.")
    shard: str | None = option(
        None,
        "I/N: sample only part I (0 to N-1) of N of the prompts, chosen by a hash of the prompt id (merge the parts with --merge).",
    )
    merge: list[str] | None = option(
        None,
        "Stage dirs of --shard runs (comma-separated) to combine into output_dir; give the parts' config, without --shard.",
    )

    def __post_init__(self) -> None:
        if isinstance(self.model_name_or_path, str):  # RSConfig(model_name_or_path="path") from Python: one member
            self.model_name_or_path = [self.model_name_or_path]

    def validate(self) -> None:
        self.validate_engine()
        if self.shard is not None:
            shard_of(self.shard)
            if self.merge:
                raise ConfigError(
                    "--shard and --merge exclude each other: run each part with --shard, then merge them without it"
                )
            if self.engine == "transformers" and self.batch_size != 1:
                raise ConfigError(
                    "--shard with the transformers engine needs --batch_size 1: it seeds per batch, so with"
                    " larger batches the parts would not add up to the unsharded run"
                )
        if not self.model_name_or_path:
            raise ConfigError(
                "'model_name_or_path' names no model; give one, or several (comma-separated) for a committee"
            )
        repeated = sorted({m for m in self.model_name_or_path if self.model_name_or_path.count(m) > 1})
        if repeated:
            raise ConfigError(
                f"'model_name_or_path' lists {repeated[0]} twice; committee members share the sampling seeds,"
                " so a repeat adds only copies: list each model once"
            )
        if self.num_samples < 1:
            raise ConfigError(f"'num_samples' must be >= 1 (K candidates per prompt), got {self.num_samples}")
        if self.tau < 0:
            raise ConfigError(f"'tau' must be >= 0 (0: a noise-free annotator), got {self.tau}")
        for key in ("max_tokens", "shard_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"'{key}' must be >= 1, got {getattr(self, key)}")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ConfigError(f"'max_prompts' must be >= 1, got {self.max_prompts}")
        if self.temperature < 0:
            raise ConfigError(f"'temperature' must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"'top_p' must be in (0, 1], got {self.top_p}")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward):
            raise ConfigError(
                f"'reward_weights' has {len(self.reward_weights)} values for {len(self.reward)} --reward specs"
            )

    def sampling_params(self, positions: list[int]) -> SamplingParams:
        """Prompt ``i`` of the whole prompt set is sampled with seed ``seed + i``."""
        return SamplingParams(
            n=self.num_samples,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_tokens=self.max_tokens,
            seeds=tuple(self.seed + i for i in positions),
        )


def shard_of(spec: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N), with 0 <= I < N."""
    part, _, total = spec.partition("/")
    try:
        index, count = int(part), int(total)
    except ValueError:
        index, count = -1, 0
    if not 0 <= index < count:
        raise ConfigError(f"'shard' must be I/N with 0 <= I < N (e.g. 0/4 ... 3/4), got {spec!r}")
    return index, count


def in_shard(prompt_id: str, index: int, count: int) -> bool:
    """Whether a prompt belongs to part ``index`` of ``count``: a stable hash of its id."""
    return int.from_bytes(hashlib.sha256(prompt_id.encode()).digest()[:8], "big") % count == index


class ShardStore:
    """DIR/shards/: ``manifest.json`` (the config and the input fingerprints the run started from)
    and ``shard-NNNNN-MM.json`` (prompt shard N of committee member M), each written atomically.
    A changed config or changed inputs are caught before this, by ``align.core.stage_dir.stage_state``
    reading the manifest."""

    def __init__(self, root: Path, identity: dict[str, Any], inputs: dict[str, Any]):
        self.root = root
        self.identity = identity
        self.inputs = inputs

    def open(self) -> dict[tuple[int, int], dict[str, Any]]:
        """Check or write the manifest; return the complete shards already on disk, by (member, shard)."""
        manifest = self.root / SHARD_MANIFEST
        if not manifest.is_file() or not shard_files(self.root.parent):  # no shard yet: nothing to continue
            atomic_write_json(manifest, {**self.identity, "inputs": self.inputs})
        found = {}
        for path in shard_files(self.root.parent):
            _, index, member = path.stem.split("-")
            try:
                found[int(member), int(index)] = json.loads(path.read_text())
            except (ValueError, UnicodeDecodeError):  # cut short after it was written (a copy, a lost disk block)
                print(f"warning: shard file {path} is not whole JSON; sampling that shard again", file=sys.stderr)
                path.unlink()
        return found

    def write(self, member: int, index: int, record: dict[str, Any]) -> None:
        atomic_write_text(self.root / f"shard-{index:05d}-{member:02d}.json", json.dumps(record) + "\n")


def key_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    """``align status``: rows kept, their mean reward and, over a committee, the rows each member supplied."""
    wins = summary.get("wins") or {}
    return {
        "kept_rows": summary.get("kept_rows"),
        "mean_reward": summary.get("mean_reward"),
        "wins": format_wins(wins) if len(wins) > 1 else None,
    }


@command(
    "rs",
    RSConfig,
    "Rejection sampling: K samples per prompt (from one model or a committee), scored, best-of-K / pairs / all -> dataset.",
    order=21,
    artifacts=("data",),
    metrics=key_metrics,
)
def run_rs(cfg: RSConfig, engine: Engine | None = None) -> dict:
    """Run the stage; returns the stage record. ``engine`` is a live engine serving the first
    member, reused (it is not closed); the other members are loaded and freed one at a time."""
    rows = load_prompts(cfg.dataset, cfg.max_prompts)
    positions = list(range(len(rows)))
    if cfg.shard is not None:
        positions = [i for i, r in enumerate(rows) if in_shard(r["prompt_id"], *shard_of(cfg.shard))]
        if not positions:
            raise DataError(
                f"{cfg.dataset}: shard {cfg.shard} holds none of its {len(rows)} prompts; use fewer shards"
            )
        rows = [rows[i] for i in positions]
    scorer = cfg.build_scorer()
    check_scorer_accepts(scorer, rows, cfg.dataset)
    stage = Stage("rs", cfg, cfg.output_dir)
    if cfg.merge:
        return merge_parts(stage, cfg, rows, [Path(d) for d in cfg.merge])
    if not stage.prepare(overwrite=cfg.overwrite):
        return read_stage(cfg.output_dir)
    store = ShardStore(stage.dir / SHARDS, cfg.identity(), stage.inputs)
    done = store.open()
    starts = range(0, len(rows), cfg.shard_size)
    members = cfg.model_name_or_path
    units = [(m, i) for m in range(len(members)) for i in range(len(starts))]  # one member at a time
    todo = [u for u in units if u not in done]
    stage.truncate_metrics(after_step=len(done))
    for m, member in enumerate(members):
        mine = [i for mm, i in todo if mm == m]
        if not mine:
            continue
        live = engine if m == 0 and engine is not None else None
        work = Workload([r["prompt"] for r in rows], cfg.num_samples, cfg.max_tokens)
        current = live or cfg.build_engine(member, seed=cfg.seed, work=work)
        try:
            for i in mine:
                part = slice(starts[i], starts[i] + cfg.shard_size)
                done[m, i] = _run_shard(current, scorer, cfg, m, rows[part], positions[part], cfg.dataset)
                store.write(m, i, done[m, i])
                step = m * len(starts) + i  # the position of (m, i) in units
                stage.log(_shard_metrics(step, done[m, i], member))
                _progress(step + 1, len(units), done[m, i], member if len(members) > 1 else None)
                if preempt.requested() and (m, i) != todo[-1]:  # safe point: this shard is on disk
                    raise preempt.stopped(
                        f"after shard {step + 1}/{len(units)}",
                        f"{len(done)} shards kept in {store.root}",
                        rerun="rerun the same command",
                    )
        finally:
            if live is None:
                current.close()
    shards = [_join_members([done[m, i] for m in range(len(members))]) for i in range(len(starts))]
    return _finish(stage, cfg, rows, shards, resumed=len(units) - len(todo))


def _run_shard(
    engine, scorer, cfg: RSConfig, member: int, rows: list[dict], positions: list[int], dataset: str
) -> dict[str, Any]:
    """Generate, score and record one shard of one member (selection happens at the end, from the records)."""
    started = time.perf_counter()
    outputs = engine.generate([r["prompt"] for r in rows], cfg.sampling_params(positions))
    generated = time.perf_counter()
    try:
        rewards = score_candidates(scorer, rows, outputs)
    except DataError as err:
        raise DataError(f"{dataset}: {err}") from None
    first = member * cfg.num_samples  # member m's candidates are numbered m*K .. m*K+K-1
    model = cfg.model_name_or_path[member]
    prompts = []
    for row, cands, scores in zip(rows, outputs, rewards):
        dups = dedupe([c.text for c in cands])
        prompts.append(
            {
                "prompt_id": row["prompt_id"],
                "candidates": [
                    {
                        "index": first + k,
                        "model": model,
                        "text": c.text,
                        "reward": s,
                        "num_tokens": len(c.token_ids),
                        "finish_reason": c.finish_reason,
                        "duplicate_of": None if d is None else first + d,
                    }
                    for k, (c, s, d) in enumerate(zip(cands, scores, dups))
                ],
            }
        )
    return {
        "start": positions[0],
        "engine": engine.name,
        "sampler": getattr(engine, "sampler", engine.name),
        "threads": cpu_threads(engine),  # vLLM's decoding threads on CPU; None from transformers or on a GPU
        "kv_cache_gb": getattr(engine, "kv_cache_gb", None),
        "generate_seconds": generated - started,
        "score_seconds": time.perf_counter() - generated,
        "tokens": sum(len(c.token_ids) for cands in outputs for c in cands),
        "prompts": prompts,
    }


def used_threads(shards: list[dict[str, Any]]) -> int | list[int] | None:
    """The decoding threads the shards were generated with: one number, or each value used when a
    resumed run changed them (None for shards written before it was recorded, or by transformers)."""
    values = sorted({s["threads"] for s in shards if s.get("threads")})
    return values[0] if len(values) == 1 else (values or None)


def _largest(records: list[dict[str, Any]], key: str) -> Any:
    """The largest set value of ``key`` over ``records`` (None when no record sets it)."""
    return max((r[key] for r in records if r.get(key)), default=None)


def _join_members(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One prompt shard's records of every member -> one record, each prompt's candidates in member order."""
    return {
        "engine": "+".join(sorted({p["engine"] for p in parts})),
        "sampler": "+".join(sorted({p.get("sampler", "unknown") for p in parts})),
        "threads": _largest(parts, "threads"),
        "kv_cache_gb": _largest(parts, "kv_cache_gb"),
        **{key: sum(p[key] for p in parts) for key in ("generate_seconds", "score_seconds", "tokens")},
        "prompts": [
            {"prompt_id": group[0]["prompt_id"], "candidates": [c for p in group for c in p["candidates"]]}
            for group in zip(*(p["prompts"] for p in parts))
        ],
    }


def _shard_metrics(index: int, shard: dict[str, Any], model: str) -> dict[str, Any]:
    rewards = [c["reward"] for p in shard["prompts"] for c in p["candidates"]]
    return {
        "step": index + 1,
        "model": model,
        "prompts": len(shard["prompts"]),
        "mean_reward": sum(rewards) / len(rewards),
        "truncated_frac": truncated_fraction([c["finish_reason"] for p in shard["prompts"] for c in p["candidates"]]),
        "tokens_per_s": shard["tokens"] / max(shard["generate_seconds"], 1e-9),
    }


def _progress(done: int, total: int, shard: dict[str, Any], member: str | None) -> None:
    m = _shard_metrics(done - 1, shard, member or "")
    print(
        f"rs: shard {done}/{total}{f' ({member})' if member else ''}: {m['prompts']} prompts, mean reward"
        f" {m['mean_reward']:.3f}, {m['tokens_per_s']:,.0f} tokens/s",
        file=sys.stderr,
        flush=True,
    )


def select_rows(cfg: RSConfig, rows: list[dict], records: list[dict]) -> list[dict]:
    """Apply the selection strategy to every prompt's distinct candidates, in prompt order."""
    strategy = STRATEGIES[cfg.select]
    opts = SelectOptions(min_margin=cfg.min_margin, min_reward=cfg.min_reward, tau=cfg.tau, seed=cfg.seed)
    out = []
    for row, record in zip(rows, records):
        distinct = [
            Scored(c["index"], c["text"], c["reward"], c["model"])
            for c in record["candidates"]
            if c["duplicate_of"] is None
        ]
        out.extend(strategy(row, distinct, opts))
    return out


def _finish(
    stage: Stage,
    cfg: RSConfig,
    rows: list[dict],
    shards: list[dict],
    resumed: int,
    extra: dict[str, Any] | None = None,
) -> dict:
    records = [p for s in shards for p in s["prompts"]]
    if [r["prompt_id"] for r in records] != [r["prompt_id"] for r in rows]:  # shards must tile the prompts
        raise RuntimeError("rs shards do not cover the prompts exactly once; rerun with --overwrite")
    started = time.perf_counter()
    selected = select_rows(cfg, rows, records)
    select_seconds = time.perf_counter() - started
    _write_dataset(stage.dir / "data", selected)
    atomic_write_text(
        stage.dir / CANDIDATES,
        "".join(
            json.dumps(
                {
                    "prompt_id": r["prompt_id"],
                    "candidate_index": c["index"],
                    "model": c["model"],
                    "text": c["text"],
                    "reward": c["reward"],
                    "num_tokens": c["num_tokens"],
                    "finish_reason": c["finish_reason"],
                    "duplicate_of": c["duplicate_of"],
                }
            )
            + "\n"
            for r in records
            for c in r["candidates"]
        ),
    )
    rewards = [c["reward"] for r in records for c in r["candidates"]]
    generate_seconds = sum(s["generate_seconds"] for s in shards)
    tokens = sum(s["tokens"] for s in shards)
    threads = used_threads(shards)
    one_model = len(cfg.model_name_or_path) == 1 and isinstance(threads, int)  # a committee's share: no one size
    speed = generation_speed(tokens, generate_seconds, cfg.model_name_or_path[0], threads if one_model else None)
    summary = {
        "prompts": len(records),
        "candidates": len(rewards),
        "distinct_candidates": sum(c["duplicate_of"] is None for r in records for c in r["candidates"]),
        "kept_rows": len(selected),
        "select": cfg.select,
        "engine": "+".join(sorted({s.get("engine", "unknown") for s in shards})),  # the one(s) that generated
        "sampler": "+".join(
            sorted({s.get("sampler", "unknown") for s in shards})
        ),  # align's CPU sampler or the engine's own
        "threads": threads,
        "kv_cache_gb": _largest(shards, "kv_cache_gb"),
        "mean_reward": sum(rewards) / len(rewards),
        "max_reward": max(rewards),
        "mean_best_reward": sum(max(c["reward"] for c in r["candidates"]) for r in records) / len(records),
        "truncated_frac": truncated_fraction([c["finish_reason"] for r in records for c in r["candidates"]]),
        **committee_summary(cfg.model_name_or_path, records, selected),
        "tokens": tokens,
        **speed,
        "generate_seconds": round(generate_seconds, 3),
        "score_seconds": round(sum(s["score_seconds"] for s in shards), 3),
        "select_seconds": round(select_seconds, 3),
        "shards": len(shards),
        "resumed_shards": resumed,
        **({"shard": cfg.shard} if cfg.shard else {}),
        **(extra or {}),
    }
    record = stage.finish(summary, {"data": str(stage.dir / "data"), "candidates": str(stage.dir / CANDIDATES)})
    shutil.rmtree(stage.dir / SHARDS, ignore_errors=True)
    members = cfg.model_name_or_path
    per = f" x {len(members)} models (rows per model: {format_wins(summary['wins'])})" if len(members) > 1 else ""
    print(
        f"rs: kept {len(selected)} {cfg.select} rows from {len(records)} prompts x {cfg.num_samples} samples{per}"
        f" (mean reward {summary['mean_reward']:.4f}, best-of-K {summary['mean_best_reward']:.4f}) -> {stage.dir / 'data'}"
    )
    if generate_seconds > 0:
        print(f"rs: generated {tokens:,} tokens at {describe(speed, threads)}")
    return record


def committee_summary(members: list[str], records: list[dict], selected: list[dict]) -> dict[str, Any]:
    """``wins``: kept rows per member (a pair counts for its chosen side's); ``member_mean_reward``."""
    wins = dict.fromkeys(members, 0)
    for row in selected:
        wins[row.get("chosen_model", row.get("model"))] += 1
    rewards: dict[str, list[float]] = {m: [] for m in members}
    for r in records:
        for c in r["candidates"]:
            rewards[c["model"]].append(c["reward"])
    return {
        "members": list(members),
        "wins": wins,
        "member_mean_reward": {m: sum(v) / len(v) for m, v in rewards.items()},
    }


def format_wins(wins: dict[str, int]) -> str:
    """``{"runs/sft/model": 30, "runs/dpo/model": 2}`` -> ``"sft/model 30, dpo/model 2"`` (the last two path parts)."""
    return ", ".join(f"{'/'.join(Path(m).parts[-2:])} {n}" for m, n in wins.items())


def _write_dataset(final: Path, rows: list[dict]) -> None:
    import datasets

    with staging_dir(final) as tmp:
        datasets.Dataset.from_list(rows).save_to_disk(str(tmp))


def merge_parts(stage: Stage, cfg: RSConfig, rows: list[dict], parts: list[Path]) -> dict:
    """Combine the stage dirs of ``--shard I/N`` runs into the output of the unsharded run.

    Each part must be a finished rs stage whose config equals ``cfg`` but for ``shard`` (and
    output_dir and the memory knobs); together they must hold parts 0..N-1 exactly once. Their
    candidates are put back in prompt order and selected again with the same code as an
    unsharded run, so data/ is row for row the unsharded run's.
    """
    if not stage.prepare(overwrite=cfg.overwrite):
        return read_stage(cfg.output_dir)
    want = {k: v for k, v in cfg.identity().items() if k not in ("shard", "output_dir")}
    seen: dict[int, Path] = {}
    counts = set()
    candidates: dict[str, list[dict]] = {}
    timing = {"generate_seconds": 0.0, "score_seconds": 0.0}
    for part in parts:
        record = read_stage(part)
        if record is None or record.get("stage") != "rs":
            raise ConfigError(
                f"--merge: {part} is not a finished rs stage (no stage.json); run `align rs --shard I/N` into it first"
            )
        got = {
            k: cfg.recorded(k, v)
            for k, v in record["config"].items()
            if k not in (*cfg.run_control, "shard", "output_dir")
        }
        changed = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
        if changed:
            k = changed[0]
            raise ConfigError(
                f"--merge: {part} was sampled with another config ({k}: {got.get(k)!r}, here {want.get(k)!r});"
                " merge parts of one run, given with that run's config"
            )
        if not record["config"].get("shard"):
            raise ConfigError(f"--merge: {part} is an unsharded rs run; merge the dirs of `align rs --shard I/N` runs")
        index, count = shard_of(record["config"]["shard"])
        if index in seen:
            raise ConfigError(f"--merge: shard {index}/{count} given twice ({seen[index]} and {part})")
        seen[index] = part
        counts.add(count)
        for key in timing:
            timing[key] += record["summary"][key]
        for line in (part / CANDIDATES).read_text().splitlines():
            c = json.loads(line)
            candidates.setdefault(c.pop("prompt_id"), []).append({"index": c.pop("candidate_index"), **c})
    if len(counts) > 1:
        raise ConfigError(
            f"--merge: the parts split the prompts in different ways (N = {', '.join(map(str, sorted(counts)))})"
        )
    missing = sorted(set(range(counts.pop())) - set(seen))
    if missing:
        raise ConfigError(
            f"--merge: shard(s) {', '.join(f'{i}/{len(seen) + len(missing)}' for i in missing)} missing;"
            " run them, then merge all parts"
        )
    ids = [r["prompt_id"] for r in rows]
    if sorted(candidates) != sorted(ids):
        raise DataError(
            f"--merge: the parts sampled {len(candidates)} prompts, {cfg.dataset} now holds {len(ids)} other or"
            " more; was it changed since the parts ran? Rerun the parts"
        )
    records = [{"prompt_id": pid, "candidates": candidates[pid]} for pid in ids]
    whole = {**timing, "tokens": sum(c["num_tokens"] for r in records for c in r["candidates"]), "prompts": records}
    return _finish(stage, cfg, rows, [whole], resumed=0, extra={"merged_parts": len(parts)})
