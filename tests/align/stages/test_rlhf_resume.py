"""`align rlhf` checkpoints: safe loading (weights_only, strict), atomic writes, incomplete ones skipped."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

from align.cli import main
from align.core.config import parse_config
from align.core.stage_dir import Stage
from align.rl.optimizers import get_optimizer
from align.rl.rollout import build_rollouts
from align.stages.rlhf import RLHFConfig, load_checkpoint, restore_rng, save_checkpoint

from conftest import ROOT

CONFIG = ROOT / "configs" / "demo_rlhf.yaml"


def _cfg(model, out, *extra) -> RLHFConfig:
    return parse_config(
        RLHFConfig,
        [
            "--config",
            str(CONFIG),
            "--model_name_or_path",
            str(model),
            "--dataset",
            "unused",
            "--output_dir",
            str(out),
            "--optimizer",
            "ppo",
            *map(str, extra),
        ],
    )


def _policy(cfg):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from align.training.models import peft_config

    policy = AutoModelForCausalLM.from_pretrained(cfg.model_name_or_path)
    lora = peft_config(cfg)
    return get_peft_model(policy, lora) if lora is not None else policy


def _trained(cfg):
    """A policy and its optimizer (PPO: with a value head) after one update on random rollouts."""
    policy = _policy(cfg)
    opt = get_optimizer(cfg.optimizer)(cfg, policy, None)
    gen = torch.Generator().manual_seed(0)
    rollouts = build_rollouts(
        [[5, 6, 7]] * 2,
        [[torch.randint(5, 40, (5,), generator=gen).tolist()] * 2] * 2,
        [[False, True]] * 2,
        [1.0, 0.0, 0.5, 0.2],
        pad_id=0,
    )
    opt.update(rollouts)
    return policy, opt


def _tied_model(source, out):
    """The tiny model's architecture with the output layer tied to the embeddings."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source, tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return out


@pytest.mark.parametrize("variant", ["full", "tied", "lora"])
def test_checkpoint_round_trip(variant, tiny_model, tmp_path):
    """What save_checkpoint writes loads back exactly (state.pt through torch.load(weights_only=True))."""
    model = _tied_model(tiny_model, tmp_path / "tied") if variant == "tied" else tiny_model
    cfg = _cfg(model, tmp_path, "--kl_coef", "0", *(["--use_lora", "true"] if variant == "lora" else []))
    torch.manual_seed(0)
    policy, opt = _trained(cfg)
    random.seed(7)
    torch.manual_seed(7)
    path = save_checkpoint(Stage("rlhf", cfg, tmp_path), 3, policy, opt, {"before": {"eval_mean_reward_before": 0.25}})
    expected_draws = (random.random(), torch.rand(3))
    weights = "adapter_model.safetensors" if variant == "lora" else "model.safetensors"
    assert {"checkpoint.json", "state.pt", weights} <= {p.name for p in path.iterdir()}
    assert not list(path.parent.glob(".checkpoint-3.*"))  # the staging folder was renamed into place
    if variant == "tied":  # written once, under the embedding's name
        from safetensors.torch import load_file

        assert "lm_head.weight" not in load_file(path / "model.safetensors")

    torch.manual_seed(1)  # another init: LoRA's A and the value head differ until loaded
    fresh = _policy(cfg)
    fresh_opt = get_optimizer(cfg.optimizer)(cfg, fresh, None)
    state = load_checkpoint(path, fresh, fresh_opt)
    assert (state["iteration"], state["before"]) == (3, {"eval_mean_reward_before": 0.25})
    for (name, a), (_, b) in zip(policy.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(opt.extra["value_head"].weight, fresh_opt.extra["value_head"].weight)
    assert opt.optimizer.state_dict()["state"].keys() == fresh_opt.optimizer.state_dict()["state"].keys()
    for a, b in zip(opt.optimizer.state_dict()["state"].values(), fresh_opt.optimizer.state_dict()["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"])
    restore_rng(state)
    assert random.random() == expected_draws[0] and torch.equal(torch.rand(3), expected_draws[1])


def test_latest_checkpoint_skips_incomplete_ones_with_a_warning(tiny_model, tmp_path, capsys):
    cfg = _cfg(tiny_model, tmp_path, "--kl_coef", "0")
    stage = Stage("rlhf", cfg, tmp_path)
    policy, opt = _trained(cfg)
    good = save_checkpoint(stage, 2, policy, opt, {"before": {}})
    capsys.readouterr()  # transformers' progress bars
    cut = stage.checkpoints_dir / "checkpoint-4"  # marker cut short (a copy or a filesystem without atomic rename)
    shutil.copytree(good, cut)
    (cut / "checkpoint.json").write_text((cut / "checkpoint.json").read_text()[:40])
    bare = stage.checkpoints_dir / "checkpoint-6"  # a Trainer checkpoint killed before trainer_state.json
    bare.mkdir()
    shutil.copy(good / "model.safetensors", bare)
    assert stage.latest_checkpoint() == good
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"warning: skipping incomplete checkpoint {bare} (no whole trainer_state.json or checkpoint.json:"
        " its write was cut short)",
        f"warning: skipping incomplete checkpoint {cut} (checkpoint.json is not whole JSON: its write was cut short)",
    ]
    (bare / "trainer_state.json").write_text(json.dumps({"global_step": 6}))
    assert stage.latest_checkpoint() == bare and capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "other, message",
    [
        ("fewer_layers", "does not fit the policy: 18 missing weights (e.g. model.layers.2.self_attn.q_proj.weight);"),
        (
            "narrower",
            "does not fit the policy: 39 of another shape (e.g. model.embed_tokens.weight [105, 64] vs [105, 128]);",
        ),
        ("lora", "holds no full model weights (model.safetensors), which this policy needs;"),
    ],
)
def test_resume_from_a_checkpoint_of_another_model_fails_in_one_line(
    other, message, tiny_model, demo_data, tmp_path, capsys
):
    """A checkpoint written for another model must not half-load: exit 2, one line, nothing written."""
    from align.tasks.tiny import make_tiny_model

    shape = {"fewer_layers": {"num_layers": 2}, "narrower": {"hidden_size": 64}, "lora": {}}[other]
    source = make_tiny_model(tmp_path / "other", **shape) if shape else tiny_model
    out = tmp_path / "rl"
    src_cfg = _cfg(source, out, "--kl_coef", "0", *(["--use_lora", "true"] if other == "lora" else []))
    policy, opt = _trained(src_cfg)
    save_checkpoint(Stage("rlhf", src_cfg, out), 2, policy, opt, {"before": {}})
    capsys.readouterr()
    code = main(
        [
            "rlhf",
            "--config",
            str(CONFIG),
            "--model_name_or_path",
            str(tiny_model),
            "--optimizer",
            "ppo",
            "--kl_coef",
            "0",
            "--dataset",
            str(demo_data / "prompts.jsonl"),
            "--output_dir",
            str(out),
            "--num_iterations",
            "2",
            "--engine",
            "transformers",
            "--resume",
        ]
    )
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "Loading weights" not in line]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert (
        lines[0].startswith(f"align rlhf: error: checkpoint {out / 'checkpoints' / 'checkpoint-2'} ")
        and message in lines[0]
    )
    assert lines[0].endswith(
        "resume with the model and LoRA settings it was written with, or pass --overwrite to start over"
    )
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints"]
