"""``align merge``: model soups and WARP's SLERP on tiny models built on the fly (seconds)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from align.cli import main
from align.training.merging import slerp, warp
from tests.conftest import run_align


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Three same-architecture tiny llamas (seeds 1, 2, 3) and one of another hidden size."""
    from align.tasks.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("merge_models")
    made = {
        f"s{seed}": make_tiny_model(root / f"s{seed}", seed=seed, hidden_size=64, num_layers=2, intermediate_size=128)
        for seed in (1, 2, 3)
    }
    made["wide"] = make_tiny_model(root / "wide", seed=1, hidden_size=128, num_layers=2, intermediate_size=128)
    made["qwen"] = make_tiny_model(
        root / "qwen", arch="qwen2", seed=1, hidden_size=64, num_layers=2, intermediate_size=128
    )
    return made


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def merge(tmp_path, *flags) -> dict:
    out = tmp_path / "merged"
    assert main(["merge", "--output_dir", str(out), *map(str, flags)]) == 0
    return json.loads((out / "stage.json").read_text())


# --------------------------------------------------------------------------------- pure math


def test_slerp_of_two_vectors_matches_hand_computation():
    a, b = torch.tensor([2.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    # omega = pi/2, sin(omega) = 1: slerp = sin((1-t) pi/2) a + sin(t pi/2) b
    half, linear = slerp(a, b, 0.5)
    assert not linear and torch.allclose(half, torch.tensor([2 * math.sqrt(0.5), math.sqrt(0.5)], dtype=torch.float64))
    third, _ = slerp(a, b, 1 / 3)
    assert torch.allclose(third, torch.tensor([2 * math.cos(math.pi / 6), math.sin(math.pi / 6)], dtype=torch.float64))
    # 60 degrees apart: omega = pi/3, at t = 1/2 both weights are sin(pi/6) / sin(pi/3) = 1/sqrt(3)
    c = torch.tensor([math.cos(math.pi / 3), math.sin(math.pi / 3)], dtype=torch.float64)
    mid, _ = slerp(torch.tensor([1.0, 0.0], dtype=torch.float64), c, 0.5)
    assert torch.allclose(mid, (torch.tensor([1.0, 0.0], dtype=torch.float64) + c) / math.sqrt(3))
    assert torch.allclose(mid.norm(), torch.tensor(1.0, dtype=torch.float64))  # stays on the unit circle
    # parallel task vectors: linear interpolation, flagged
    par, linear = slerp(torch.tensor([1.0, 1.0]), torch.tensor([3.0, 3.0]), 0.25)
    assert linear and torch.equal(par, torch.tensor([1.5, 1.5]))


def test_warp_interpolates_back_toward_the_base():
    base = torch.tensor([1.0, 1.0])
    a, b = base + torch.tensor([2.0, 0.0]), base + torch.tensor([0.0, 1.0])
    merged, _ = warp(base, a, b, 0.5, eta=0.5)
    expected = base.double() + 0.5 * torch.tensor([2 * math.sqrt(0.5), math.sqrt(0.5)], dtype=torch.float64)
    assert merged.dtype == torch.float32 and torch.allclose(merged, expected.float())
    assert torch.equal(warp(base, a, b, 0.3, eta=0.0)[0], base)


# --------------------------------------------------------------------------------- the stage


def test_average_of_two_copies_is_that_model_bitwise(models, tmp_path):
    record = merge(tmp_path, "--models", f"{models['s1']},{models['s1']}")
    merged, original = weights(tmp_path / "merged" / "model"), weights(models["s1"])
    assert merged.keys() == original.keys()
    assert all(t.dtype == torch.float32 and torch.equal(t, original[k]) for k, t in merged.items())
    summary = record["summary"]
    assert record["stage"] == "merge" and summary["method"] == "average" and summary["weights"] == [0.5, 0.5]
    assert summary["tensors_merged"] == len(original) and summary["parameters"] == sum(
        t.numel() for t in original.values()
    )
    # the output is a normal model folder: transformers loads it with its tokenizer and chat template
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged" / "model", use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged" / "model")
    assert tok.chat_template and model.config.hidden_size == 64
    ids = torch.tensor([tok.encode("12+34=")])
    ref = AutoModelForCausalLM.from_pretrained(models["s1"], use_safetensors=True)
    assert torch.equal(model(ids).logits, ref(ids).logits)
    # rerunning the same merge is a no-op
    mtime = (tmp_path / "merged" / "stage.json").stat().st_mtime_ns
    merge(tmp_path, "--models", f"{models['s1']},{models['s1']}")
    assert (tmp_path / "merged" / "stage.json").stat().st_mtime_ns == mtime


def test_weighted_average(models, tmp_path):
    record = merge(tmp_path, "--models", f"{models['s1']},{models['s2']}", "--weights", "3,1")
    merged, a, b = weights(tmp_path / "merged" / "model"), weights(models["s1"]), weights(models["s2"])
    assert record["summary"]["weights"] == [0.75, 0.25]
    for key, tensor in merged.items():
        assert torch.allclose(tensor, 0.75 * a[key] + 0.25 * b[key], atol=1e-7), key
    assert not torch.equal(merged["model.embed_tokens.weight"], a["model.embed_tokens.weight"])


@pytest.mark.parametrize("t, endpoint", [(0.0, "s1"), (1.0, "s2")])
def test_slerp_endpoints_are_the_models(models, tmp_path, t, endpoint):
    record = merge(
        tmp_path,
        "--models",
        f"{models['s1']},{models['s2']}",
        "--method",
        "slerp",
        "--base",
        models["s3"],
        "--t",
        t,
        "--eta",
        1,
    )
    merged, expected = weights(tmp_path / "merged" / "model"), weights(models[endpoint])
    assert all(torch.equal(tensor, expected[k]) for k, tensor in merged.items())
    assert record["summary"]["t"] == t and record["summary"]["base"] == str(models["s3"])


def test_slerp_midpoint_per_tensor(models, tmp_path):
    merge(
        tmp_path,
        "--models",
        f"{models['s1']},{models['s2']}",
        "--method",
        "slerp",
        "--base",
        models["s3"],
        "--t",
        0.5,
        "--eta",
        0.5,
    )
    merged, a, b, base = (
        weights(p) for p in (tmp_path / "merged" / "model", models["s1"], models["s2"], models["s3"])
    )
    key = "model.layers.0.mlp.up_proj.weight"
    ta, tb = (a[key] - base[key]).double().flatten(), (b[key] - base[key]).double().flatten()
    omega = torch.arccos(ta @ tb / (ta.norm() * tb.norm()))
    expected = base[key].double().flatten() + 0.5 * (torch.sin(omega / 2) / torch.sin(omega)) * (ta + tb)
    assert torch.allclose(merged[key].flatten(), expected.float(), atol=1e-6)


def test_lora_output_is_merged_into_its_base_first(models, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(models["s1"], use_safetensors=True)
    lora = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    torch.manual_seed(0)
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)  # peft starts B at zero: make the adapter change the weights
    stage_dir = tmp_path / "lora_run"
    lora.save_pretrained(stage_dir / "adapter")
    AutoTokenizer.from_pretrained(models["s1"]).save_pretrained(stage_dir / "adapter")
    expected = {k: v.detach().clone() for k, v in lora.merge_and_unload().state_dict().items()}

    record = merge(tmp_path, "--models", f"{stage_dir},{stage_dir}")
    merged, original = weights(tmp_path / "merged" / "model"), weights(models["s1"])
    key = "model.layers.0.self_attn.q_proj.weight"
    assert record["summary"]["inputs"][0] == {"path": str(stage_dir / "adapter"), "kind": "adapter"}
    assert not any("lora" in k for k in merged)
    assert not torch.allclose(merged[key], original[key]) and torch.allclose(merged[key], expected[key])


@pytest.mark.slow
def test_mismatched_shapes_exit_2_naming_the_tensor(models, tmp_path):
    proc = run_align("merge", "--models", f"{models['s1']},{models['wide']}", "--output_dir", tmp_path / "out")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    vocab = weights(models["s1"])["model.embed_tokens.weight"].shape[0]
    assert f"tensor 'model.embed_tokens.weight' has shape ({vocab}, 64) in {models['s1']}" in proc.stderr
    assert f"but ({vocab}, 128) in {models['wide']}" in proc.stderr
    assert not (tmp_path / "out" / "model").exists() and not (tmp_path / "out" / "stage.json").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--method", "slerpp"], "unknown merge method 'slerpp' (did you mean 'slerp'?); valid: average, slerp"),
        (["--method", "slerp"], "method 'slerp' needs 'base'"),
        (["--weights", "1"], "'weights' has 1 values for 2 models"),
        (["--weights", "1,-1"], "'weights' must be non-negative with a positive sum"),
        (["--method", "slerp", "--base", "b", "--t", "1.5"], "'t' must be in [0, 1], got 1.5"),
        (["--base", "b"], "'base' is not used by method 'average'"),
    ],
)
def test_bad_options_exit_2_with_one_line(capsys, flags, message):
    assert main(["merge", "--models", "a,b", "--output_dir", "o", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_other_architecture_and_three_slerp_models_fail_cleanly(models, tmp_path, capsys):
    assert main(["merge", "--models", f"{models['s1']},{models['qwen']}", "--output_dir", str(tmp_path / "a")]) == 2
    assert "config 'model_type' is 'qwen2' but" in capsys.readouterr().err
    three = ",".join(str(models[k]) for k in ("s1", "s2", "s3"))
    assert (
        main(
            [
                "merge",
                "--models",
                three,
                "--method",
                "slerp",
                "--base",
                str(models["s3"]),
                "--output_dir",
                str(tmp_path / "b"),
            ]
        )
        == 2
    )
    assert "method 'slerp' merges exactly 2 models, got 3" in capsys.readouterr().err
    assert main(["merge", "--models", f"{tmp_path},{models['s1']}", "--output_dir", str(tmp_path / "c")]) == 2
    assert "not a model folder or stage dir" in capsys.readouterr().err
