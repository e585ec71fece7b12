"""What ``align dpo`` adds to TRL's DPOTrainer, as a small subclass and a collator (not a fork).

1. **Formatting-token masking** (Llama 3, arXiv 2407.21783, section 4.1.4): the chat format's
   header and termination special tokens are removed from the summed log-probs of both the
   chosen and the rejected response. ``MaskingPreferenceCollator`` zeroes those positions of
   TRL's ``completion_mask`` after padding; every term TRL derives from that mask (policy and
   reference log-probs, IPO's length normalization, the NLL term, the metrics) then ignores them,
   because TRL scores only positions whose label is not -100. Departure from the paper: the
   NLL term skips the masked tokens as well (the paper masks them "in the loss"; it does not say
   whether that includes the NLL regularizer).
2. **Prompt-length policy**: prompts longer than ``max_prompt_length`` tokens are truncated (the
   last tokens are kept, nearest the response) or skipped, and counted. TRL silently drops
   prompts that fill ``max_length``; we count them instead.
3. **Length-grouped batches** (``group_by_length``): a ``length`` column (prompt + longer
   response) lets transformers' LengthGroupedSampler batch pairs of similar length. TRL's
   DPOTrainer cannot use it: the sampler looks for ``input_ids``, which its pairs lack.
4. **Reference log-probs cached on disk**: with ``precompute_ref_log_probs``, the per-pair
   reference log-probs are stored in ``CACHE_DIR/<key>.safetensors``, keyed by the reference
   model's identity, the tokenized pairs and every setting that changes them (``RefLogpsCache``).
   A rerun, a resumed run or a run with another learning rate reuses them without any reference
   forward pass (TRL's own cache lives in the dataset's cache folder, which for in-memory data
   is a temporary one).
5. **Reference forward first** (live reference): TRL runs the reference forward after the
   policy's, while the policy's activations are held for backward, so the reference's transient
   buffers add to the step's peak memory. We run it before (same computation, same numbers), so
   they are freed first: a lower peak at no cost in time.
6. **Online Merging Optimizer** (``online_merging``): ``create_optimizer`` builds
   ``align.rl.merging_optimizer.OnlineMergingAdamW`` over Trainer's usual parameter groups.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from trl import DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference

SAMPLE_CONVERSATION = [
    {"role": "system", "content": "s"},
    {"role": "user", "content": "u"},
    {"role": "assistant", "content": "a"},
    {"role": "user", "content": "u"},
    {"role": "assistant", "content": "a"},
]


def formatting_token_ids(tokenizer, names: list[str] | None = None) -> list[int]:
    """Ids of the chat format's special tokens (Llama 3's header and termination tokens).

    ``names`` given: exactly those tokens (each must be a single token of the vocabulary).
    Otherwise: render a sample multi-turn conversation with the tokenizer's chat template and
    keep the special tokens that appear in it (``<|start_header_id|>``, ``<|end_header_id|>``,
    ``<|eot_id|>`` for Llama 3; ``<|user|>``, ``<|assistant|>``, ``<|end|>`` for our tiny models).
    """
    from align.core.errors import ConfigError

    if names:
        vocab = tokenizer.get_vocab()
        missing = [n for n in names if n not in vocab]
        if missing:
            raise ConfigError(
                f"formatting_tokens {missing} are not single tokens of the tokenizer's vocabulary; "
                "list special tokens exactly as the chat template writes them"
            )
        return sorted({vocab[n] for n in names})
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    for sample in (SAMPLE_CONVERSATION, SAMPLE_CONVERSATION[1:]):  # some templates reject a system turn
        try:
            ids = tokenizer.apply_chat_template(sample, tokenize=True, return_dict=False)
        except Exception:  # jinja raise_exception(...) surfaces as several exception types
            continue
        if ids and isinstance(ids[0], list):
            ids = ids[0]
        return sorted({i for i in ids if i in special})
    return []


@dataclass
class MaskingPreferenceCollator(DataCollatorForPreference):
    """TRL's preference collator, then ``completion_mask = 0`` wherever the token is in ``mask_ids``."""

    mask_ids: tuple[int, ...] = ()

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().torch_call(examples)
        if self.mask_ids:
            masked = torch.isin(batch["input_ids"], torch.tensor(self.mask_ids, dtype=batch["input_ids"].dtype))
            batch["completion_mask"] = batch["completion_mask"].masked_fill(masked, 0)
        return batch


def _sha256(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def hub_commit(repo_id: str) -> str | None:
    """The commit a Hub id's default branch points to (transformers' ``resolve_revision``, which
    falls back to the local cache offline), or None when it cannot be resolved."""
    try:
        from transformers.utils.hub import resolve_revision

        return getattr(resolve_revision(repo_id, None), "resolved", None)
    except Exception:  # best effort, like transformers' own resolution: the id still identifies it
        return None


def model_identity(name_or_path: str) -> dict[str, Any]:
    """What identifies a reference model's weights.

    A folder: its resolved path and each weight file's and the config's name, size and
    modification time (no hashing of the weights). A file (a ``.gguf`` model): its resolved path
    and the sha256 of its content (``align.core.fingerprint``'s digest cache, shared with the stage's
    input fingerprints, so it is read once). A Hub id: the id and the commit its default branch
    resolves to, so a new upload to the repository is a new reference.
    """
    path = Path(name_or_path).expanduser()
    if path.is_file():
        from align.core.fingerprint import DigestCache

        digests = DigestCache()
        digest = digests.file_digest(path)
        digests.save()
        return {"path": str(path.resolve()), "sha256": digest}
    if not path.is_dir():
        return {"hub_id": name_or_path, "commit": hub_commit(name_or_path)}
    files = sorted(p for p in path.iterdir() if p.suffix == ".safetensors" or p.name == "config.json")
    return {
        "path": str(path.resolve()),
        "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files],
    }


class RefLogpsCache:
    """Reference log-probs on disk: ``DIR/<key>.safetensors`` (two float32 vectors) + ``<key>.json``.

    The key hashes ``identity`` (reference model, dtype, mixed precision, masking and length settings, TRL version)
    together with the tokenized pairs, so any change to the data, the tokenizer or the chat
    template yields a new key. ``hit`` and ``forward_batches`` report what happened in this run.
    """

    def __init__(self, directory: str | Path, identity: dict[str, Any]):
        self.dir = Path(directory).expanduser()
        self.identity = identity
        self.hit: bool | None = None
        self.path: Path | None = None

    def key(self, dataset) -> str:
        columns = dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]).to_dict()
        return _sha256({"identity": self.identity, "data": _sha256(columns)})[:32]

    def load(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        from safetensors.torch import load_file

        self.path = self.dir / f"{key}.safetensors"
        if not self.path.is_file():
            return None
        tensors = load_file(self.path)
        return tensors["ref_chosen_logps"], tensors["ref_rejected_logps"]

    def save(self, key: str, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        from safetensors.torch import save_file

        from align.core.stage_dir import atomic_write_json

        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".{key}.{os.getpid()}.tmp"
        save_file({"ref_chosen_logps": chosen.contiguous(), "ref_rejected_logps": rejected.contiguous()}, tmp)
        os.replace(tmp, self.dir / f"{key}.safetensors")
        atomic_write_json(self.dir / f"{key}.json", {"identity": self.identity, "rows": len(chosen)})


LENGTH_COLUMN = "length"


class AlignDPOTrainer(DPOTrainer):
    """DPOTrainer with the prompt-length policy and the on-disk reference log-prob cache.

    Masking needs no override: pass a ``MaskingPreferenceCollator`` as ``data_collator``.
    ``prompt_report`` counts what the prompt-length policy did; ``ref_forward_batches`` counts
    reference forward passes made to precompute log-probs (0 on a cache hit).
    """

    def __init__(
        self,
        *args,
        max_prompt_length: int | None = None,
        long_prompts: str = "skip",
        ref_cache: RefLogpsCache | None = None,
        online_merging=None,
        **kwargs,
    ):
        self.max_prompt_length = max_prompt_length
        self.online_merging = online_merging  # OnlineMergingOptions: train with OnlineMergingAdamW
        self.long_prompts = long_prompts
        self.ref_cache = ref_cache
        self.prompt_report = {"long_prompts_truncated": 0, "long_prompts_skipped": 0}
        self.ref_forward_batches = 0
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model=None):
        if self.online_merging is None or self.optimizer is not None:
            return super().create_optimizer(model)
        # Trainer's grouping (no decay on norms and biases) with our class; the task vectors are taken
        # here, when the policy still holds the starting weights, and dropped once sparsified.
        from align.rl.merging_optimizer import OnlineMergingAdamW

        args = self.args
        self.optimizer_cls_and_kwargs = (
            OnlineMergingAdamW,
            {
                **self.online_merging.merging_kwargs(self.model, seed=args.seed),
                "lr": args.learning_rate,
                "betas": (args.adam_beta1, args.adam_beta2),
                "eps": args.adam_epsilon,
            },
        )
        try:
            return super().create_optimizer(model)
        finally:
            self.optimizer_cls_and_kwargs = None

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # Tokenize without TRL's silent drop of over-long prompts (max_length=None skips it), then
        # apply our counted policy. The collator still truncates prompt+response to max_length.
        max_length, args.max_length = args.max_length, None
        try:
            dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        finally:
            args.max_length = max_length
        dataset = self._apply_prompt_policy(dataset)
        if args.train_sampling_strategy == "group_by_length":
            dataset = dataset.map(
                lambda ex: {LENGTH_COLUMN: len(ex["prompt_ids"]) + max(len(ex["chosen_ids"]), len(ex["rejected_ids"]))}
            )
        return dataset

    def _apply_prompt_policy(self, dataset):
        limit = self.max_prompt_length
        if limit is None:
            return dataset
        too_long = [i for i, ids in enumerate(dataset["prompt_ids"]) if len(ids) > limit]
        if not too_long:
            return dataset
        if self.long_prompts == "skip":
            self.prompt_report["long_prompts_skipped"] += len(too_long)
            drop = set(too_long)
            return dataset.select([i for i in range(len(dataset)) if i not in drop])
        self.prompt_report["long_prompts_truncated"] += len(too_long)
        return dataset.map(lambda ex: {"prompt_ids": ex["prompt_ids"][-limit:]})

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self.args.train_sampling_strategy == "group_by_length" and LENGTH_COLUMN not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, LENGTH_COLUMN]  # kept for the sampler

    def _compute_loss(self, model, inputs, return_outputs):
        if self.precompute_ref_logps:
            return super()._compute_loss(model, inputs, return_outputs)
        # Live reference: its forward runs before the policy's (see the module docstring, point 5);
        # TRL then reads the log-probs from the batch as it does for precomputed ones.
        ref_chosen, ref_rejected = super().compute_ref_log_probs(self.ref_model or self.model, inputs)
        inputs = {**inputs, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
        self.precompute_ref_logps = True
        try:
            return super()._compute_loss(model, inputs, return_outputs)
        finally:
            self.precompute_ref_logps = False

    def compute_ref_log_probs(self, model, inputs):
        self.ref_forward_batches += 1
        return super().compute_ref_log_probs(model, inputs)

    def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
        if self.ref_cache is None:
            return super()._precompute_ref_logps(dataset, name, batch_size)
        key = self.ref_cache.key(dataset)
        cached = self.ref_cache.load(key)
        self.ref_cache.hit = cached is not None
        if cached is None:
            # The global RNG is left as it was: the pass's DataLoader draws its base seed from it, and
            # the training sampler drawn later would then shuffle differently on a miss than on a hit
            # (seen as a 26-35% slower "hit" in bench_dpo: other batches, more padding).
            with torch.random.fork_rng(devices=[]):
                cached = self._reference_pass(dataset, batch_size)
            if self.accelerator.is_main_process:
                self.ref_cache.save(key, *cached)
            self.accelerator.wait_for_everyone()
        chosen, rejected = cached
        if len(chosen) != len(dataset):  # a foreign or truncated file under our key
            raise RuntimeError(
                f"reference cache {self.ref_cache.path} holds {len(chosen)} rows, expected {len(dataset)}"
            )
        dataset = dataset.add_column("ref_chosen_logps", chosen.tolist())
        return dataset.add_column("ref_rejected_logps", rejected.tolist())

    def _reference_pass(self, dataset, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-probs of every pair, in dataset order (sharded over processes, gathered)."""
        from torch.utils.data import DataLoader

        loader = self.accelerator.prepare(
            DataLoader(dataset, batch_size=batch_size, collate_fn=self.data_collator, shuffle=False, num_workers=0)
        )
        model = self.ref_model or self.model
        if self.ref_model is None and self.is_deepspeed_enabled:  # as TRL: gather ZeRO-sharded weights
            from trl.models import prepare_deepspeed

            if self._precompute_engine is None:
                self._precompute_engine = prepare_deepspeed(self.model, self.accelerator)
            model = self._precompute_engine
        chosen, rejected = [], []
        for batch in loader:
            c, r = self.compute_ref_log_probs(model, batch)
            c, r = self.accelerator.gather_for_metrics((c, r))
            chosen.append(c.float().cpu())
            rejected.append(r.float().cpu())
        return torch.cat(chosen), torch.cat(rejected)
