"""``align distill``: a random tiny student distilled from the demo SFT model (the teacher) on the
demo task, through the CLI; its KL to the teacher on held-out prompts must fall. Plus the
shared-vocabulary check, resume from a checkpoint, and the option checks (seconds each)."""

from __future__ import annotations

import json
import shutil

import pytest

from align.cli import main
from align.pipeline.status import key_metrics
from align.stages.distill import heldout_kl, teacher_sequences, vocab_mismatch

from conftest import read_jsonl, run_align

STEPS, SAVE = 30, 15


def distill(out, student, teacher, demo_data, *flags):
    return run_align(
        "distill",
        "--model_name_or_path",
        student,
        "--teacher",
        teacher,
        "--dataset",
        demo_data / "sft.jsonl",
        "--eval_dataset",
        demo_data / "test.jsonl",
        "--eval_max_prompts",
        32,
        "--eval_max_tokens",
        8,
        "--max_new_tokens",
        8,
        "--max_steps",
        STEPS,
        "--save_steps",
        SAVE,
        "--learning_rate",
        2e-3,
        "--logging_steps",
        5,
        "--lmbda",
        0.5,
        "--output_dir",
        out,
        *flags,
        timeout=600,
    )


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, tiny_model, sft_model, demo_data):
    """The random tiny llama distilled from the demo SFT model for STEPS steps (half on-policy)."""
    out = tmp_path_factory.mktemp("distill") / "run"
    proc = distill(out, tiny_model, sft_model, demo_data, "--keep_checkpoints")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_heldout_kl_to_the_teacher_falls(distilled, sft_model, demo_data):
    record = json.loads((distilled / "stage.json").read_text())
    s = record["summary"]
    assert record["stage"] == "distill" and s["global_step"] == STEPS
    # A random student is far from the teacher (about log |V| nats), the distilled one much closer.
    assert s["heldout_kl_before"] > 2.0, s
    assert s["heldout_kl"] < 0.75 * s["heldout_kl_before"], s
    assert s["heldout_kl_prompts"] == 32 and s["heldout_kl_tokens"] >= 32
    assert key_metrics("distill", record) == {"held_out": s["eval_mean_reward"], "heldout_kl": s["heldout_kl"]}
    losses = [r["loss"] for r in read_jsonl(distilled / "metrics.jsonl") if "loss" in r]
    assert len(losses) == STEPS // 5 and all(x >= 0 for x in losses)

    # The saved student reproduces the recorded figure; the teacher against itself is at 0.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.training.evaluation import load_prompts

    tok = AutoTokenizer.from_pretrained(sft_model)
    teacher = AutoModelForCausalLM.from_pretrained(sft_model)
    student = AutoModelForCausalLM.from_pretrained(distilled / "model")
    prompts = [r["prompt"] for r in load_prompts(str(demo_data / "test.jsonl"), 32)]
    seqs = teacher_sequences(teacher, tok, prompts, 8)
    kl, tokens = heldout_kl(student, teacher, seqs, tok.pad_token_id)
    assert tokens == s["heldout_kl_tokens"] and kl == pytest.approx(s["heldout_kl"], rel=1e-3)
    assert heldout_kl(teacher, teacher, seqs, tok.pad_token_id)[0] == pytest.approx(0.0, abs=1e-6)


def test_resume_after_a_crash_continues_from_the_checkpoint(distilled, tmp_path, tiny_model, sft_model, demo_data):
    """A run that died after its step-SAVE checkpoint (later files gone) resumes there and ends where
    the uninterrupted run ended."""
    out = tmp_path / "run"
    shutil.copytree(distilled, out)
    for name in ("stage.json", "model", f"checkpoints/checkpoint-{STEPS}"):
        shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    proc = distill(out, tiny_model, sft_model, demo_data, "--keep_checkpoints")
    assert proc.returncode == 2 and "pass --resume to continue" in proc.stderr
    proc = distill(out, tiny_model, sft_model, demo_data, "--keep_checkpoints", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((out / "stage.json").read_text())["summary"]
    full = json.loads((distilled / "stage.json").read_text())["summary"]
    assert (s["resumed_from_step"], s["global_step"]) == (SAVE, STEPS)
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r] == list(range(5, STEPS + 1, 5))
    assert s["heldout_kl"] == pytest.approx(full["heldout_kl"], rel=1e-3)


def test_teacher_with_another_vocabulary_exits_2_in_one_line(tmp_path, capsys, tiny_model, demo_data):
    """A teacher whose tokenizer gained tokens (so its vocabulary is larger) is refused before any
    weights load, naming both models and both sizes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = tmp_path / "teacher"
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tok.add_tokens(["<extra_1>", "<extra_2>", "<extra_3>"])
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(teacher)
    tok.save_pretrained(teacher)
    n = len(AutoTokenizer.from_pretrained(tiny_model))

    out = tmp_path / "out"
    capsys.readouterr()  # drop the loading output above
    assert (
        main(
            [
                "distill",
                "--model_name_or_path",
                str(tiny_model),
                "--teacher",
                str(teacher),
                "--dataset",
                str(demo_data / "sft.jsonl"),
                "--output_dir",
                str(out),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert (
        f"teacher {teacher} has a vocabulary of {n + 3} ids ({n + 3} tokens) but student {tiny_model} has"
        f" {n} ({n} tokens)"
    ) in err
    assert not (out / "stage.json").exists() and not (out / "model").exists()


def test_same_size_vocabularies_that_map_tokens_differently_are_refused():
    student = ("s", 3, {"a": 0, "b": 1, "c": 2})
    assert vocab_mismatch(student, ("t", 3, {"a": 0, "b": 1, "c": 2})) is None
    why = vocab_mismatch(student, ("t", 3, {"a": 0, "b": 2, "c": 1}))
    assert why.startswith(
        "teacher t and student s both have 3 ids but map tokens differently (2 differ, e.g. 'b': id 2 vs 1)"
    )


def _gkd_step(trainer, batch, on_policy: bool):
    """One training step on ``batch`` as the training loop runs it (with the ``num_items_in_batch``
    transformers counts on the batch's labels); returns (that count, loss, gradient of every weight)."""
    import torch

    trainer.lmbda = 1.0 if on_policy else -1.0  # GKDTrainer draws on-policy when random() <= lmbda
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.zero_grad(set_to_none=True)
    count = trainer._get_num_items_in_batch([batch], trainer.args.device)
    loss = trainer.training_step(trainer.model, dict(batch), count)
    grads = torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])
    return int(count), loss.item(), grads


def test_an_on_policy_step_weighs_as_much_as_a_fixed_one(tmp_path, tiny_model):
    """The student's sample is the short response: the on-policy step then has the loss and the
    gradients of a fixed-response step on that response, and both are the mean generalized JSD
    over its tokens, although the dataset row the on-policy step came from has a longer response."""
    import warnings

    import datasets
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.import_utils import TRLExperimentalWarning

    from align.stages.distill import gkd_trainer_class
    from align.tasks.tiny import make_tiny_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TRLExperimentalWarning)
        from trl.experimental.gkd import GKDConfig

    tok = AutoTokenizer.from_pretrained(tiny_model)
    teacher = AutoModelForCausalLM.from_pretrained(make_tiny_model(tmp_path / "teacher", seed=1))
    prompt = [{"role": "user", "content": "2+3="}]
    rows = [{"messages": prompt + [{"role": "assistant", "content": text}]} for text in ("5", "5, since 2 + 3 = 5")]
    args = GKDConfig(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        bf16=False,
        report_to="none",
        beta=0.5,
        gradient_checkpointing=False,
        max_length=64,
        max_new_tokens=4,
        per_device_train_batch_size=1,
    )
    trainer = gkd_trainer_class()(
        model=AutoModelForCausalLM.from_pretrained(tiny_model),
        teacher_model=teacher,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tok,
    )
    short, long = (trainer.data_collator([row]) for row in rows)
    sample = (short["input_ids"], short["attention_mask"], short["labels"])
    trainer.generate_on_policy_outputs = lambda model, inputs, generation_config: sample  # the student "samples" it

    fixed_tokens, fixed, fixed_grads = _gkd_step(trainer, short, on_policy=False)
    dataset_tokens, sampled, sampled_grads = _gkd_step(trainer, long, on_policy=True)
    assert (fixed_tokens, dataset_tokens) == (2, 19)  # "5<|end|>" vs "5, since 2 + 3 = 5<|end|>", a token a char

    # By hand: JSD_0.5 at each position that predicts a response token, averaged over those 3.
    with torch.no_grad():
        s = F.log_softmax(trainer.model(input_ids=short["input_ids"]).logits[0, :-1], -1)
        t = F.log_softmax(teacher(input_ids=short["input_ids"]).logits[0, :-1], -1)
    m = torch.logsumexp(torch.stack([s, t]), 0) - torch.log(torch.tensor(2.0))
    jsd = 0.5 * (t.exp() * (t - m)).sum(-1) + 0.5 * (s.exp() * (s - m)).sum(-1)
    expected = jsd[short["labels"][0, 1:] != -100].mean().item()
    assert fixed == pytest.approx(expected, rel=1e-5) and expected > 0.01
    assert sampled == pytest.approx(fixed, rel=1e-5)
    torch.testing.assert_close(sampled_grads, fixed_grads, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lmbda", "1.5"], "'lmbda' must be in [0, 1], got 1.5"),
        (["--beta", "-0.1"], "'beta' must be in [0, 1], got -0.1"),
        (["--temperature", "0"], "'temperature' must be positive, got 0.0"),
        (["--max_new_tokens", "0"], "'max_new_tokens' must be at least 1, got 0"),
    ],
)
def test_bad_options_exit_2_with_one_line(capsys, flags, message):
    assert (
        main(["distill", "--model_name_or_path", "s", "--teacher", "t", "--dataset", "d", "--output_dir", "o", *flags])
        == 2
    )
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_distill_is_a_recipe_stage_kind(tmp_path):
    from align.pipeline.recipe import Recipe, stage_kinds

    assert "distill" in stage_kinds()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"workdir: {tmp_path / 'w'}\n"
        "stages:\n"
        "  - {name: data, kind: demo-data}\n"
        "  - {name: tiny, kind: make-tiny-model}\n"
        "  - {name: sft, kind: sft, model_name_or_path: '${tiny.model}', dataset: '${data.data}/sft.jsonl'}\n"
        "  - name: kd\n"
        "    kind: distill\n"
        "    model_name_or_path: ${tiny.model}\n"
        "    teacher: ${sft.model}\n"
        "    dataset: ${data.data}/sft.jsonl\n"
        "    lmbda: 1.0\n"
    )
    cfg = Recipe.load(recipe).config("kd")
    w = tmp_path / "w"
    assert (cfg.teacher, cfg.model_name_or_path, cfg.lmbda, cfg.output_dir) == (
        str(w / "sft/model"),
        str(w / "tiny/model"),
        1.0,
        str(w / "kd"),
    )
