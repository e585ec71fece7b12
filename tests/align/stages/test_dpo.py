"""`align dpo`: loss registry, pair filters, masking, parity with TRL, cached reference log-probs,
learning on the demo task, resume after a crash, and bad input."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from align.cli import main
from align.core.config import parse_config
from align.core.errors import ConfigError, DataError
from align.stages.dpo import DPO_LOSSES, DPOConfig, build_trainer, filter_pairs, resolve_losses, run_dpo

from conftest import ROOT, read_jsonl, run_align


def config(*flags, **values) -> DPOConfig:
    argv = ["--model_name_or_path", "m", "--dataset", "d", "--output_dir", "o", *map(str, flags)]
    for key, value in values.items():
        argv += [f"--{key}", str(value)]
    return parse_config(DPOConfig, argv)


# --------------------------------------------------------------------------------- losses


def test_loss_registry_maps_to_trl_types_and_weights():
    assert resolve_losses(["sigmoid", "nll"]) == (["sigmoid", "sft"], [1.0, 0.2])  # Llama 3's default
    assert resolve_losses(["ipo", "nll:0.5"]) == (["ipo", "sft"], [1.0, 0.5])
    assert resolve_losses(["robust"]) == (["robust"], [1.0])
    assert config().loss == ["sigmoid", "nll"] and config().beta == 0.1 and config().mask_formatting_tokens


def test_methods_doc_offers_no_cdpo_and_credits_hinge_to_rso():
    """TRL 1.16's sigmoid loss has no label smoothing, so no cDPO is offered; ``hinge`` (relu(1 -
    beta * margin) on the reference-normalized log-ratios) is RSO's loss, not SLiC's."""
    text = (ROOT / "docs" / "methods.md").read_text()
    dpo = " ".join(text[text.index("## DPO") : text.index("## Online optimizers")].split())
    assert "cDPO (label smoothing)" not in dpo and "SLiC)" not in dpo
    assert (
        "cDPO (conservative DPO, the sigmoid loss with label smoothing) is not offered: TRL 1.16's `sigmoid`"
        " loss has no label smoothing, and `--label_smoothing` applies to the robust loss only."
    ) in dpo
    assert 'hinge (RSO, Liu et al. 2023, "Statistical Rejection Sampling Improves Preference Optimization":' in dpo
    assert (
        DPO_LOSSES["hinge"].source
        == "RSO, Liu et al. 2023: SLiC's hinge on the normalized likelihood, max(0, 1 - beta * margin)"
    )
    assert DPO_LOSSES["hinge"].trl_type == "hinge" and "robust" in [
        n for n, loss in DPO_LOSSES.items() if loss.preference
    ]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--loss", "sigmoud"], f"unknown loss 'sigmoud' (did you mean 'sigmoid'?); valid: {', '.join(DPO_LOSSES)}"),
        (["--loss", "nll"], "'loss' needs a preference loss (sigmoid, ipo, robust, hinge)"),
        (["--loss", "sigmoid,sigmoid"], "loss 'sigmoid' is listed twice"),
        (["--loss", "sigmoid,nll:much"], "loss 'nll:much': the weight after ':' must be a number"),
        (["--label_smoothing", "0.1"], "'label_smoothing' only applies to the robust loss"),
        (["--loss", "robust", "--label_smoothing", "0.5"], "'label_smoothing' must be in [0, 0.5), got 0.5"),
        (
            ["--max_length", "64", "--max_prompt_length", "64"],
            "'max_prompt_length' must be in [1, max_length=64), got 64",
        ),
        (["--beta", "0"], "'beta' must be positive, got 0.0"),
        (["--near_identical_ratio", "1.5"], "'near_identical_ratio' must be in (0, 1], got 1.5"),
    ],
)
def test_bad_options_exit_2_with_one_line(capsys, flags, message):
    code = main(["dpo", "--model_name_or_path", "m", "--dataset", "d", "--output_dir", "o", *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err


# --------------------------------------------------------------------------------- filters


def pair(prompt: str, chosen: str, rejected: str, **extra) -> dict:
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        **extra,
    }


def test_filter_pairs_counts_each_rule():
    rows = [
        pair("1+1=", "2", "3", preference="better"),
        pair("1+1=", "2", "3", preference="better"),  # repeated
        pair("2+2=", "4", "4", preference="better"),  # chosen == rejected
        pair("3+3=", "the answer is 6", "the answer is 7", preference="significantly better"),  # near-identical
        pair("4+4=", "8", "9", preference="slightly better"),  # filtered by strength
    ]
    cfg = config("--keep_preferences", "significantly better,better", "--near_identical_ratio", "0.9")
    kept, report = filter_pairs(rows, cfg, "x.jsonl")
    assert kept == [rows[0]]
    assert report == {
        "pairs_in": 5,
        "filtered_by_preference": 1,
        "identical_skipped": 1,
        "duplicates_dropped": 1,
        "near_identical_dropped": 1,
    }
    kept, report = filter_pairs(rows, config("--drop_duplicates", "false"), "x.jsonl")
    assert len(kept) == 4 and report["identical_skipped"] == 1 and report["duplicates_dropped"] == 0


def test_filter_pairs_errors_name_the_row():
    with pytest.raises(DataError, match=r"x.jsonl row 2: no 'strength' column, which keep_preferences filters on"):
        filter_pairs(
            [pair("a", "b", "c", strength="better"), pair("a", "b", "d")],
            config("--keep_preferences", "better", "--preference_column", "strength"),
            "x.jsonl",
        )
    with pytest.raises(
        DataError, match=r"x.jsonl: no preference pairs left after filtering \(pairs_in=1, .*identical_skipped=1"
    ):
        filter_pairs([pair("a", "b", "b")], config(), "x.jsonl")


# --------------------------------------------------------------------------------- masking


def test_formatting_tokens_come_from_the_chat_template(tiny_model):
    from transformers import AutoTokenizer

    from align.training.dpo_trainer import formatting_token_ids

    tok = AutoTokenizer.from_pretrained(tiny_model)
    ids = formatting_token_ids(tok)
    assert tok.convert_ids_to_tokens(ids) == ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    assert tok.pad_token_id not in ids and tok.bos_token_id not in ids  # special, but not written by the template
    assert formatting_token_ids(tok, ["<|end|>"]) == [tok.convert_tokens_to_ids("<|end|>")]
    with pytest.raises(ConfigError, match=r"formatting_tokens \['<eot>'\] are not single tokens"):
        formatting_token_ids(tok, ["<eot>"])


@pytest.fixture(scope="module")
def policy_pair(tiny_model, tmp_path_factory):
    """A policy that differs from the reference (the tiny model plus seeded noise), saved as a folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("policy")
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    return out, tiny_model


def _trainer(policy, reference, pairs, tmp_path, *flags):
    import datasets

    from align.core.stage_dir import Stage

    cfg = config(
        "--model_name_or_path",
        policy,
        "--ref_model",
        reference,
        "--output_dir",
        tmp_path / "out",
        "--ref_cache_dir",
        tmp_path / "cache",
        "--max_length",
        64,
        *flags,
    )
    return build_trainer(cfg, datasets.Dataset.from_list(pairs), Stage("dpo", cfg, cfg.output_dir))


def _per_example(trainer, rows) -> list[tuple[float, float]]:
    """(loss, reward margin) of each row as its own batch, as the trainer computes them."""
    out = []
    trainer.model.train()
    with torch.no_grad():
        for row in rows:
            loss = trainer.compute_loss(trainer.model, trainer.data_collator([row]))
            out.append((loss.item(), trainer._metrics["train"]["rewards/margins"][-1]))
    return out


def _sequence_logps(model, prompt_ids, completion_ids, keep=lambda token: True) -> float:
    """Sum of log p(token | prefix) over the completion tokens that ``keep`` accepts (by hand)."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logps = F.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
    total = 0.0
    for pos in range(len(prompt_ids), len(prompt_ids) + len(completion_ids)):
        if keep(ids[0, pos].item()):
            total += logps[pos - 1, ids[0, pos]].item()
    return total


def test_parity_with_trl_dpo_trainer(policy_pair, demo_data, tmp_path):
    """Masking and NLL off: per-example loss and margin equal TRL's own DPOTrainer (live reference),
    while ours reads the reference log-probs from the on-disk cache; both equal the hand formula."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer

    policy, reference = policy_pair
    pairs = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in read_jsonl(demo_data / "pairs.jsonl")[:8]]
    ours = _trainer(policy, reference, pairs, tmp_path, "--loss", "sigmoid", "--mask_formatting_tokens", "false")
    assert ours.ref_cache.hit is False and ours.ref_forward_batches == 1

    import datasets

    trl = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(policy),
        ref_model=AutoModelForCausalLM.from_pretrained(reference),
        args=TRLDPOConfig(
            output_dir=str(tmp_path / "trl"),
            beta=0.1,
            max_length=64,
            use_cpu=True,
            bf16=False,
            report_to="none",
            gradient_checkpointing=False,
        ),
        train_dataset=datasets.Dataset.from_list(pairs),
        processing_class=AutoTokenizer.from_pretrained(policy),
    )
    live = _trainer(
        policy,
        reference,
        pairs,
        tmp_path,
        "--loss",
        "sigmoid",
        "--mask_formatting_tokens",
        "false",
        "--precompute_ref_log_probs",
        "false",
    )
    for column in ("prompt_ids", "chosen_ids", "rejected_ids"):
        assert ours.train_dataset[column] == trl.train_dataset[column] == live.train_dataset[column]
    ours_values = _per_example(ours, [ours.train_dataset[i] for i in range(8)])
    trl_values = _per_example(trl, [trl.train_dataset[i] for i in range(8)])
    live_values = _per_example(live, [live.train_dataset[i] for i in range(8)])
    flat = lambda values: [x for pair in values for x in pair]  # noqa: E731
    assert flat(live_values) == pytest.approx(
        flat(trl_values), abs=1e-6
    )  # our live reference (run first): TRL's numbers

    policy_model = AutoModelForCausalLM.from_pretrained(policy)
    ref_model = AutoModelForCausalLM.from_pretrained(reference)
    for i, ((loss, margin), (trl_loss, trl_margin)) in enumerate(zip(ours_values, trl_values)):
        assert loss == pytest.approx(trl_loss, abs=1e-5) and margin == pytest.approx(trl_margin, abs=1e-5)
        row = ours.train_dataset[i]
        delta = sum(
            sign
            * (
                _sequence_logps(policy_model, row["prompt_ids"], row[col])
                - _sequence_logps(ref_model, row["prompt_ids"], row[col])
            )
            for sign, col in ((1, "chosen_ids"), (-1, "rejected_ids"))
        )
        assert margin == pytest.approx(0.1 * delta, abs=1e-5)
        assert loss == pytest.approx(-F.logsigmoid(torch.tensor(0.1 * delta)).item(), abs=1e-5)
    assert len({round(m, 4) for _, m in ours_values}) > 1  # the policy really differs from the reference


def test_live_reference_runs_before_the_policy(policy_pair, demo_data, tmp_path):
    """The live reference forward comes first, so its buffers are freed before the policy's
    activations are stored (TRL runs it second); it is a no-grad pass, the policy's is not."""
    policy, reference = policy_pair
    pairs = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in read_jsonl(demo_data / "pairs.jsonl")[:2]]
    trainer = _trainer(policy, reference, pairs, tmp_path, "--precompute_ref_log_probs", "false")
    calls = []
    for name, module in (("reference", trainer.ref_model), ("policy", trainer.model)):
        module.register_forward_hook(lambda m, args, out, name=name: calls.append((name, torch.is_grad_enabled())))
    trainer.model.train()
    loss = trainer.compute_loss(
        trainer.model, trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    )
    assert calls == [("reference", False), ("policy", True)]
    assert loss.requires_grad and trainer.precompute_ref_logps is False  # the flag is restored after the step
    assert trainer.ref_forward_batches == 0  # counts precompute passes only


def test_masked_tokens_do_not_contribute(policy_pair, tiny_model, tmp_path):
    """Hand-built pairs that differ only in their final (formatting) token get the same loss when
    masked, and a loss that counts only the digits; unmasked, the formatting tokens change it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    policy, reference = policy_pair
    tok = AutoTokenizer.from_pretrained(tiny_model)
    t = tok.convert_tokens_to_ids
    prompt = [t("<|user|>"), *tok.encode("1+2=", add_special_tokens=False), t("<|end|>"), t("<|assistant|>")]
    three, four = tok.encode("3", add_special_tokens=False), tok.encode("4", add_special_tokens=False)
    ends = {"a": (t("<|end|>"), t("<|end|>")), "b": (t("<|user|>"), t("<|assistant|>"))}
    rows = {
        k: {"prompt_ids": prompt, "chosen_ids": three + [c], "rejected_ids": four + [r]} for k, (c, r) in ends.items()
    }
    text_pairs = [{"prompt": "1+2=", "chosen": "3", "rejected": "4"}]

    masked = _trainer(
        policy, reference, text_pairs, tmp_path, "--loss", "sigmoid", "--precompute_ref_log_probs", "false"
    )
    batch = masked.data_collator([rows["a"]])
    assert batch["completion_mask"].tolist() == [[0] * len(prompt) + [1, 0], [0] * len(prompt) + [1, 0]]
    (loss_a, margin_a), (loss_b, _) = _per_example(masked, [rows["a"], rows["b"]])
    assert loss_a == pytest.approx(loss_b, abs=1e-6)

    policy_model = AutoModelForCausalLM.from_pretrained(policy)
    ref_model = AutoModelForCausalLM.from_pretrained(reference)
    digits = lambda token: token not in masked.data_collator.mask_ids  # noqa: E731
    delta = sum(
        sign * (_sequence_logps(policy_model, prompt, ids, digits) - _sequence_logps(ref_model, prompt, ids, digits))
        for sign, ids in ((1, rows["a"]["chosen_ids"]), (-1, rows["a"]["rejected_ids"]))
    )
    assert margin_a == pytest.approx(0.1 * delta, abs=1e-5)

    plain = _trainer(
        policy,
        reference,
        text_pairs,
        tmp_path,
        "--loss",
        "sigmoid",
        "--precompute_ref_log_probs",
        "false",
        "--mask_formatting_tokens",
        "false",
    )
    (plain_a, _), (plain_b, _) = _per_example(plain, [rows["a"], rows["b"]])
    assert abs(plain_a - plain_b) > 1e-4 and abs(plain_a - loss_a) > 1e-4


def test_nll_term_equals_online_dpo_nll_on_the_same_log_probs(policy_pair, tmp_path):
    """The ``nll`` loss (TRL's ``sft`` type) and online DPO's NLL term give one value on the same
    per-token log-probs, for chosen responses of different lengths: both are the mean over every
    chosen token of the batch (formatting tokens masked), not a per-pair mean."""
    from align.rl.optimizers import get_optimizer
    from align.rl.rollout import Rollouts
    from align.stages.rlhf import RLHFConfig

    policy, reference = policy_pair
    pairs = [
        {"prompt": "1+2=", "chosen": "3", "rejected": "4"},
        {"prompt": "10+20=", "chosen": "30, as 1 + 2 = 3", "rejected": "40"},
    ]
    trainer = _trainer(
        policy, reference, pairs, tmp_path, "--loss", "sigmoid:0,nll:1", "--precompute_ref_log_probs", "false"
    )
    batch = trainer.data_collator(
        [trainer.train_dataset[0], trainer.train_dataset[1]]
    )  # rows: chosen 0, 1; rejected 0, 1
    trainer.model.train()
    with torch.no_grad():
        dpo_nll = trainer.compute_loss(trainer.model, batch).item()
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    logp = F.log_softmax(logits.float(), dim=-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    mask = batch["completion_mask"][:, 1:].float()
    assert mask[:2].sum(-1).tolist() == [1.0, 16.0]  # the chosen digits (the end token is masked)

    cfg = parse_config(
        RLHFConfig,
        [
            "--model_name_or_path",
            "m",
            "--dataset",
            "d",
            "--reward",
            "rule:arithmetic",
            "--output_dir",
            "o",
            "--optimizer",
            "online_dpo",
            "--nll_coef",
            "0.2",
        ],
    )
    opt = get_optimizer("online_dpo")(cfg, torch.nn.Linear(1, 1), None)
    order = [0, 2, 1, 3]  # online DPO's rows: the K = 2 samples of each prompt, scored chosen 1, rejected 0
    r = Rollouts(
        batch["input_ids"][order],
        batch["attention_mask"][order],
        mask[order],
        torch.tensor([1.0, 0.0, 1.0, 0.0]),
        k=2,
        logp_ref=torch.zeros_like(logp),
    )
    _, stats = opt.loss(r, logp[order], torch.zeros_like(logp), None)
    by_hand = -(logp[:2] * mask[:2]).sum().item() / 17
    assert stats["nll"] == pytest.approx(by_hand, rel=1e-6) and dpo_nll == pytest.approx(by_hand, rel=1e-5)
    per_pair = -((logp[:2] * mask[:2]).sum(-1) / mask[:2].sum(-1)).mean().item()
    assert abs(per_pair - by_hand) > 1e-3  # 20x the tolerance above: a per-pair mean would fail it


# --------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def dpo_run(sft_model, demo_data, tmp_path_factory) -> tuple[Path, Path]:
    """`align dpo` through the CLI from the demo SFT model, with the shipped config."""
    base = tmp_path_factory.mktemp("dpo")
    run_align(
        "dpo",
        "--config",
        ROOT / "configs" / "demo_dpo.yaml",
        "--model_name_or_path",
        sft_model,
        "--dataset",
        demo_data / "pairs.jsonl",
        "--eval_dataset",
        demo_data / "test.jsonl",
        "--output_dir",
        base / "run",
        "--ref_cache_dir",
        base / "cache",
        check=True,
    )
    return base / "run", base / "cache"


def test_dpo_learns_preferences_from_the_sft_model(dpo_run, sft_run, sft_model, demo_data):
    out, cache = dpo_run
    record = json.loads((out / "stage.json").read_text())
    assert record["stage"] == "dpo" and record["status"] == "complete"
    assert record["config"]["loss"] == ["sigmoid", "nll:0.2"] and record["config"]["model_name_or_path"] == str(
        sft_model
    )
    s = record["summary"]
    assert s["pairs_in"] == 2000 and s["train_pairs"] == 2000 and s["identical_skipped"] == 0
    assert s["global_step"] == 300 and s["num_processes"] == 1
    tok_ids = s["masked_token_ids"]
    assert len(tok_ids) == 4
    assert s["ref_logps"] == "computed" and s["ref_precompute_batches"] == 63  # ceil(2000 / 32)
    assert Path(s["ref_cache_file"]).parent == cache and Path(s["ref_cache_file"]).is_file()
    # It learns: preference accuracy (last 10 steps) and held-out greedy exact match vs the SFT
    # model (measured: 0.92, and 0.565 vs 0.275).
    assert s["reward_accuracy"] >= 0.9, s
    sft_reward = json.loads((sft_run / "stage.json").read_text())["summary"]["eval_mean_reward"]
    assert s["eval_prompts"] == 200 and s["eval_mean_reward"] >= sft_reward, (s["eval_mean_reward"], sft_reward)
    rows = read_jsonl(out / "metrics.jsonl")
    steps = [r["step"] for r in rows if "rewards/accuracies" in r]
    assert steps == list(range(10, 301, 10))
    assert rows[0]["rewards/accuracies"] < s["reward_accuracy"]
    assert (out / "model" / "model.safetensors").is_file() and len(read_jsonl(out / "eval.jsonl")) == 200
    assert not (out / "checkpoints").exists()


def test_rerun_is_noop_and_reference_logps_come_from_the_cache(dpo_run, sft_model, demo_data, tmp_path):
    out, cache = dpo_run
    args = [
        "dpo",
        "--config",
        ROOT / "configs" / "demo_dpo.yaml",
        "--model_name_or_path",
        sft_model,
        "--dataset",
        demo_data / "pairs.jsonl",
        "--eval_dataset",
        demo_data / "test.jsonl",
    ]
    before = (out / "stage.json").read_text()
    proc = run_align(*args, "--output_dir", out, "--ref_cache_dir", cache)
    assert proc.returncode == 0 and (out / "stage.json").read_text() == before
    # Another run on the same reference, pairs and settings (here: other steps and lr) never
    # recomputes the reference log-probs.
    second = tmp_path / "second"
    proc = run_align(
        *args, "--output_dir", second, "--ref_cache_dir", cache, "--max_steps", 3, "--learning_rate", "1e-5"
    )
    assert proc.returncode == 0, proc.stderr
    s = json.loads((second / "stage.json").read_text())["summary"]
    first = json.loads(before)["summary"]
    assert s["ref_logps"] == "cache_hit" and s["ref_precompute_batches"] == 0
    assert s["ref_cache_file"] == first["ref_cache_file"]
    assert sorted(p.suffix for p in cache.iterdir()) == [".json", ".safetensors"]  # one entry


def test_cache_key_changes_with_settings(policy_pair, demo_data, tmp_path):
    from align.training.dpo_trainer import RefLogpsCache

    policy, reference = policy_pair
    pairs = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in read_jsonl(demo_data / "pairs.jsonl")[:4]]
    first = _trainer(policy, reference, pairs, tmp_path)
    keys = {first.ref_cache.path.stem}
    assert _trainer(policy, reference, pairs, tmp_path, "--loss", "ipo").ref_cache.hit is True  # loss: same key
    for flags in (["--max_length", 32], ["--mask_formatting_tokens", "false"]):
        t = _trainer(policy, reference, pairs, tmp_path, *flags)
        assert t.ref_cache.hit is False
        keys.add(t.ref_cache.path.stem)
    assert _trainer(policy, reference, pairs[:3], tmp_path).ref_cache.hit is False  # other data
    assert _trainer(reference, policy, pairs, tmp_path).ref_cache.hit is False  # other reference
    assert len(keys) == 3
    stored = json.loads((tmp_path / "cache" / f"{first.ref_cache.path.stem}.json").read_text())
    assert stored["rows"] == 4 and stored["identity"]["reference"]["path"] == str(Path(reference).resolve())
    assert isinstance(first.ref_cache, RefLogpsCache)


def test_cache_key_covers_gguf_content_hub_commit_and_bf16(tmp_path, monkeypatch):
    """The key changes with a .gguf reference's content at the same path, with the commit a Hub id
    resolves to, and with bf16 (the reference pass runs under its autocast)."""
    import datasets

    from align.stages.dpo import _reference_identity
    from align.training import dpo_trainer
    from align.training.dpo_trainer import RefLogpsCache

    monkeypatch.setenv("ALIGN_FINGERPRINT_CACHE", str(tmp_path / "fingerprints.json"))
    pairs = datasets.Dataset.from_list([{"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4]}])

    def key(*flags) -> str:
        return RefLogpsCache(tmp_path / "cache", _reference_identity(config(*flags), [])).key(pairs)

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF weights, first upload")
    first = key("--model_name_or_path", gguf)
    assert key("--model_name_or_path", gguf) == first
    gguf.write_bytes(b"GGUF weights, second")
    assert key("--model_name_or_path", gguf) != first
    assert _reference_identity(config("--model_name_or_path", gguf), [])["reference"] == {
        "path": str(gguf.resolve()),
        "sha256": hashlib.sha256(b"GGUF weights, second").hexdigest(),
    }

    commits = iter(["a" * 40, "a" * 40, "b" * 40])
    monkeypatch.setattr(dpo_trainer, "hub_commit", lambda repo_id: next(commits))
    hub = key("--model_name_or_path", "org/model")
    assert key("--model_name_or_path", "org/model") == hub  # the same commit: a hit
    assert key("--model_name_or_path", "org/model") != hub  # the repository moved on

    assert key("--model_name_or_path", gguf, "--bf16", "true") != key("--model_name_or_path", gguf)


def test_resume_after_crash(tiny_model, demo_data, tmp_path, crash_at_step_3):
    head = tmp_path / "pairs.jsonl"
    head.write_text("".join((demo_data / "pairs.jsonl").read_text().splitlines(keepends=True)[:64]))
    flags = [
        "--model_name_or_path",
        tiny_model,
        "--dataset",
        head,
        "--output_dir",
        tmp_path / "out",
        "--ref_cache_dir",
        tmp_path / "cache",
        "--max_steps",
        6,
        "--save_steps",
        2,
        "--logging_steps",
        1,
        "--per_device_train_batch_size",
        8,
        "--max_length",
        64,
        "--learning_rate",
        "1e-4",
    ]

    with crash_at_step_3():
        run_dpo(parse_config(DPOConfig, list(map(str, flags))))
    assert (tmp_path / "out" / "checkpoints" / "checkpoint-2").is_dir()
    assert not (tmp_path / "out" / "stage.json").exists()

    with pytest.raises(ConfigError, match="holds an unfinished run .checkpoint-2.; pass --resume"):
        run_dpo(parse_config(DPOConfig, list(map(str, flags))))
    record = run_dpo(parse_config(DPOConfig, [*map(str, flags), "--resume"]))
    s = record["summary"]
    assert s["resumed_from_step"] == 2 and s["global_step"] == 6
    assert s["ref_logps"] == "cache_hit" and s["ref_precompute_batches"] == 0
    steps = [r["step"] for r in read_jsonl(tmp_path / "out" / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_identical_pairs_and_long_prompts_are_counted(tiny_model, tmp_path):
    rows = [pair("1+1=", "2", "3"), pair("2+2=", "4", "4"), pair("9" * 40 + "+1=", "1", "2"), pair("3+3=", "6", "7")]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = [
        "dpo",
        "--model_name_or_path",
        tiny_model,
        "--dataset",
        data,
        "--max_steps",
        1,
        "--max_length",
        40,
        "--max_prompt_length",
        20,
        "--ref_cache_dir",
        tmp_path / "cache",
        "--per_device_train_batch_size",
        2,
    ]
    assert main([*map(str, common), "--output_dir", str(tmp_path / "skip")]) == 0
    s = json.loads((tmp_path / "skip" / "stage.json").read_text())["summary"]
    assert (s["pairs_in"], s["identical_skipped"], s["long_prompts_skipped"], s["train_pairs"]) == (4, 1, 1, 2)
    assert main([*map(str, common), "--output_dir", str(tmp_path / "cut"), "--long_prompts", "truncate"]) == 0
    s = json.loads((tmp_path / "cut" / "stage.json").read_text())["summary"]
    assert (s["long_prompts_truncated"], s["long_prompts_skipped"], s["train_pairs"]) == (1, 0, 3)


def test_all_pairs_identical_fails_cleanly(capsys, tiny_model, tmp_path):
    data = tmp_path / "same.jsonl"
    data.write_text(json.dumps(pair("1+1=", "2", "2")) + "\n")
    code = main(
        ["dpo", "--model_name_or_path", str(tiny_model), "--dataset", str(data), "--output_dir", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err
    assert code == 2 and f"{data}: no preference pairs left after filtering" in err and "identical_skipped=1" in err
    assert not (tmp_path / "o" / "stage.json").exists()


@pytest.mark.slow
def test_group_by_length_batches_pairs_of_similar_length(tiny_model, tmp_path):
    """--group_by_length: the sampler batches pairs of similar length, so the padded batches hold
    far fewer tokens than in dataset order; every pair is still seen once per epoch. (400 pairs:
    the sampler sorts within mega-batches of up to 50 batches, at most a quarter of the data.)"""
    import datasets

    from align.core.stage_dir import Stage

    rng = __import__("random").Random(0)
    pairs = [
        {
            "prompt": [{"role": "user", "content": f"{i}+{i}="}],
            "chosen": [{"role": "assistant", "content": "7" * n}],
            "rejected": [{"role": "assistant", "content": "8" * n}],
        }
        for i, n in enumerate(rng.choice([1, 40]) for _ in range(400))
    ]

    def padded_tokens(*flags):
        cfg = config(
            "--model_name_or_path",
            tiny_model,
            "--output_dir",
            tmp_path / "o",
            "--ref_cache_dir",
            tmp_path / "c",
            "--max_length",
            64,
            "--per_device_train_batch_size",
            8,
            *flags,
        )
        trainer = build_trainer(cfg, datasets.Dataset.from_list(pairs), Stage("dpo", cfg, cfg.output_dir))
        batches = list(trainer.get_train_dataloader())
        assert sum(len(b["input_ids"]) for b in batches) == 2 * len(pairs)  # chosen + rejected rows, each pair once
        return sum(b["input_ids"].numel() for b in batches), trainer

    plain, _ = padded_tokens()
    grouped, trainer = padded_tokens("--group_by_length", "true")
    assert type(trainer._get_train_sampler()).__name__ == "LengthGroupedSampler"
    assert grouped < 0.75 * plain, (grouped, plain)


def test_cache_hit_and_miss_train_on_the_same_batches(policy_pair, demo_data, tmp_path):
    """Computing the reference log-probs (a cache miss) draws nothing from the global RNG, so the
    run that fills the cache and a later one that reads it shuffle and batch the pairs alike (the
    miss's reference DataLoader used to take a seed from it, and the hit trained on other batches)."""
    import datasets

    from align.core.stage_dir import Stage

    policy, reference = policy_pair
    pairs = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in read_jsonl(demo_data / "pairs.jsonl")[:24]]

    def batches():
        cfg = config(
            "--model_name_or_path",
            policy,
            "--ref_model",
            reference,
            "--output_dir",
            tmp_path / "o",
            "--ref_cache_dir",
            tmp_path / "c",
            "--max_length",
            64,
            "--per_device_train_batch_size",
            4,
            "--group_by_length",
            "true",
        )
        trainer = build_trainer(cfg, datasets.Dataset.from_list(pairs), Stage("dpo", cfg, cfg.output_dir))
        return trainer.ref_cache.hit, [b["input_ids"].tolist() for b in trainer.get_train_dataloader()]

    (miss, on_miss), (hit, on_hit) = batches(), batches()
    assert (miss, hit) == (False, True)
    assert len(on_miss) == 6 and on_miss == on_hit
