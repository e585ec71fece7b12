"""What would break on NVIDIA GPUs, pinned on the CPU: engine arguments and environment per rank,
device gating of the CPU-only pieces, mixed precision and importance sampling, model placement,
sleep mode, adapter-only LoRA syncs, refusals, the GPU install path and the GPU smoke script.
Pure functions where possible; fakes only where a GPU or a GPU engine is the missing piece."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import types

import pytest
import torch

from align.core.errors import ConfigError
from sampling import cpu_sampler, vllm_engine
from sampling.vllm_engine import RankInfo, check_colocated, engine_environment, engine_kwargs

from conftest import ROOT

BASE = dict(
    dtype="float32",
    max_model_len=512,
    kv_cache_gb=None,
    seed=3,
    trust_remote_code=False,
    gpu_memory_utilization=0.3,
    max_num_seqs=256,
    kv_block_size=32,
    enforce_eager=None,
)


# -- 1. one engine per GPU ----------------------------------------------------------------------


@pytest.mark.parametrize("rank,local_rank,world", [(0, 0, 2), (1, 1, 2), (5, 1, 8)])
def test_a_cuda_engine_for_rank_r_of_n_is_an_external_launcher_on_its_local_gpu(rank, local_rank, world):
    ranks = RankInfo(rank, local_rank, world)
    env = engine_environment("cuda", ranks)
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"]) == (str(rank), str(local_rank), str(world))
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in env
    kw = engine_kwargs("m", device="cuda", **BASE)
    assert kw["distributed_executor_backend"] == "external_launcher"
    assert kw["tensor_parallel_size"] == 1 and kw["enable_sleep_mode"] is False
    assert kw["enforce_eager"] is False  # CUDA graphs by default on a GPU
    assert "kv_cache_memory_bytes" not in kw  # sized from gpu_memory_utilization
    assert RankInfo.from_env({"RANK": str(rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(world)}) == ranks


def test_the_cpu_engine_keeps_its_arguments_and_environment():
    kw = engine_kwargs("m", device="cpu", **BASE)
    assert kw == dict(
        model="m",
        dtype="float32",
        enforce_eager=True,
        max_model_len=512,
        seed=3,
        enable_prefix_caching=True,
        trust_remote_code=False,
        kv_cache_memory_bytes=2**30,
        gpu_memory_utilization=0.3,
        max_num_seqs=256,
        block_size=32,
        enable_chunked_prefill=False,
        max_num_batched_tokens=4096,
        logprobs_mode="processed_logprobs",
    )
    assert engine_environment("cpu", RankInfo(1, 1, 2)) == {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CONFIGURE_LOGGING": "0",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    }


RANK_1_OF_2 = RankInfo(1, 1, 2)


class FakeLLM:
    """Stands in for vllm.LLM on a GPU: records its arguments and every call, in order."""

    def __init__(self, calls, **kwargs):
        self.calls, self.kwargs = calls, kwargs
        calls.append(("init", os.environ.get("LOCAL_RANK"), kwargs.get("distributed_executor_backend")))
        cache = types.SimpleNamespace(num_gpu_blocks=100, block_size=32)
        self.llm_engine = types.SimpleNamespace(vllm_config=types.SimpleNamespace(cache_config=cache))

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags):
        self.calls.append(("wake_up", tuple(tags)))

    def collective_rpc(self, method, kwargs=None):
        self.calls.append(("collective_rpc", method if isinstance(method, str) else "function"))
        return [False]

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))

    def generate(self, prompts, params, use_tqdm=False, lora_request=None):
        self.calls.append(("generate", getattr(lora_request, "lora_int_id", None)))
        out = types.SimpleNamespace(index=0, token_ids=[5], text="x", finish_reason="stop", logprobs=None)
        return [types.SimpleNamespace(outputs=[out]) for _ in prompts]


@pytest.fixture
def fake_cuda_engine(monkeypatch, tiny_model):
    """A VLLMEngine built as on a GPU (rank 1 of 2 unless ``ranks`` says otherwise): vLLM's LLM
    (``llm``: FakeLLM or a subclass) and torch.cuda calls are fakes; the current GPU is the last one set."""
    import vllm

    calls: list = []
    current = [0]

    def set_device(i):
        calls.append(("set_device", i))
        current[0] = i

    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    saved = dict(os.environ)  # the engine sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_*: not for the next test

    def build(llm=FakeLLM, ranks=RANK_1_OF_2, **options):
        calls.clear()
        monkeypatch.setattr(vllm, "LLM", lambda **kw: llm(calls, **kw))
        return vllm_engine.VLLMEngine(str(tiny_model), device="cuda", ranks=ranks, **options), calls

    yield build
    vllm_engine.VLLMEngine._alive.clear()
    os.environ.clear()
    os.environ.update(saved)


def test_the_cuda_engine_sets_its_device_before_vllm_starts_and_keeps_vllms_sampler(fake_cuda_engine):
    engine, calls = fake_cuda_engine()
    assert calls[0] == ("set_device", 1)
    assert calls[1] == ("init", "1", "external_launcher")
    assert engine.device == torch.device("cuda", 1)
    assert engine.sampler == "vllm" and not any(c[0] == "collective_rpc" for c in calls)  # no CPU sampler install


def test_engine_and_policy_must_share_a_device():
    check_colocated("cuda:1", torch.device("cuda", 1))
    check_colocated("cuda", "cuda:0")
    with pytest.raises(RuntimeError, match="engine is on cuda:0 but the policy on cuda:1"):
        check_colocated("cuda:0", "cuda:1")


class LLMOnGPU0(FakeLLM):
    """A vLLM whose worker puts the model on GPU 0 whatever LOCAL_RANK says (as a worker that
    ignored the rank would)."""

    def __init__(self, calls, **kwargs):
        super().__init__(calls, **kwargs)
        torch.cuda.set_device(0)


def test_the_engines_device_is_where_vllm_put_it_so_a_misplaced_engine_is_caught(fake_cuda_engine):
    engine, _ = fake_cuda_engine()  # rank 1: vLLM stays on the GPU set before it started
    assert engine.device == torch.device("cuda", 1)
    check_colocated(engine.device, "cuda:1")
    misplaced, _ = fake_cuda_engine(llm=LLMOnGPU0)
    assert misplaced.device == torch.device("cuda", 0)  # read after vLLM started, not from LOCAL_RANK
    with pytest.raises(RuntimeError, match="engine is on cuda:0 but the policy on cuda:1"):
        check_colocated(misplaced.device, torch.device("cuda", 1))


@pytest.mark.parametrize("stage", ["rs", "rlhf", "eval"])  # every config with the option (EngineOptions)
def test_tensor_parallel_is_refused_in_one_line(stage):
    from align.stages.eval import EvalConfig
    from align.stages.rlhf import RLHFConfig
    from align.stages.rs import RSConfig

    config = {"rs": RSConfig, "rlhf": RLHFConfig, "eval": EvalConfig}[stage]
    assert "tensor_parallel_size" in {f.name for f in dataclasses.fields(config)}
    with pytest.raises(ConfigError, match="tensor_parallel_size") as err:
        config(
            model_name_or_path="m", dataset="d", output_dir="o", reward=["rule:arithmetic"], tensor_parallel_size=2
        ).validate()
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "value,ok", [(0.0, False), (-0.1, False), (1e-3, True), (0.3, True), (1.0, True), (1.01, False)]
)
def test_gpu_memory_utilization_must_be_a_share_of_the_gpu(value, ok):
    from align.stages.eval import EvalConfig

    cfg = EvalConfig(
        model_name_or_path="m", dataset="d", output_dir="o", reward=["rule:arithmetic"], gpu_memory_utilization=value
    )
    if ok:
        cfg.validate()
        return
    with pytest.raises(ConfigError, match=r"'gpu_memory_utilization' must be in \(0, 1\]") as err:
        cfg.validate()
    assert str(value) in str(err.value)


def test_every_config_with_tensor_parallel_size_is_covered_above():
    from align.cli import _load_commands
    from align.core.registry import COMMANDS

    _load_commands()
    having = {
        name
        for name, cmd in COMMANDS.items()
        if "tensor_parallel_size" in {f.name for f in dataclasses.fields(cmd.config)}
    }
    assert having == {"rs", "rlhf", "eval"}


# -- 2. the CPU sampler only on CPU -------------------------------------------------------------


def test_the_cpu_sampler_is_not_installed_for_a_cuda_engine():
    rpc = []
    llm = types.SimpleNamespace(collective_rpc=lambda f: rpc.append(f) or [True])
    assert cpu_sampler.install(llm, "cuda") is False and rpc == []


def test_a_worker_without_the_v1_sampler_chain_or_off_the_cpu_is_left_alone():
    runner_v2 = types.SimpleNamespace(
        model_runner=types.SimpleNamespace(sampler=types.SimpleNamespace()), device=torch.device("cpu")
    )
    assert cpu_sampler._install_in_worker(runner_v2) is False
    assert cpu_sampler._install_in_worker(types.SimpleNamespace(device=torch.device("cpu"))) is False
    on_gpu = types.SimpleNamespace(device=torch.device("cuda", 0), model_runner=None)
    assert cpu_sampler._install_in_worker(on_gpu) is False


def test_the_heap_setting_and_thread_count_are_cpu_only(monkeypatch, fake_cuda_engine):
    from align.core import heap

    seen = []
    monkeypatch.setattr(heap, "keep_freed_memory", lambda: seen.append("kept") or heap.contextlib.nullcontext())
    wrapped = heap.keeps_freed_memory(lambda cfg: "ran")
    assert wrapped(types.SimpleNamespace(resolved_device=lambda: "cuda")) == "ran" and seen == []
    assert wrapped(types.SimpleNamespace(resolved_device=lambda: "cpu")) == "ran" and seen == ["kept"]
    engine, _ = fake_cuda_engine()
    assert isinstance(engine._cpu_only_settings(), heap.contextlib.nullcontext)


@pytest.mark.slow
def test_stage_json_records_the_sampler(tiny_model, demo_data, tmp_path):
    from align.stages.rlhf import RLHFConfig, run_rlhf

    out = run_rlhf(
        RLHFConfig(
            model_name_or_path=str(tiny_model),
            dataset=str(demo_data / "prompts.jsonl"),
            reward=["rule:arithmetic"],
            output_dir=str(tmp_path / "rl"),
            optimizer="grpo",
            num_iterations=1,
            prompts_per_iteration=2,
            num_samples=2,
            max_tokens=4,
            max_model_len=128,
            engine="vllm",
        )
    )
    s = out["summary"]
    assert s["sampler"] in ("align", "vllm") and s["weight_sync"] == "full"
    assert (s["engine_dtype"], s["bf16"], s["importance_sampling"]) == ("float32", False, False)


def test_eval_records_the_sampler_as_rs_and_rlhf_do(demo_data, tmp_path):
    from align.stages.eval import EvalConfig, run_eval
    from sampling.base import Candidate

    class Engine:
        name, sampler, threads, device = "vllm", "vllm", 1, torch.device("cuda", 0)

        def generate(self, prompts, params):
            return [[Candidate("x", [5], "stop", None)] * params.n for _ in prompts]

    dataset = tmp_path / "test.jsonl"
    dataset.write_text("".join((demo_data / "test.jsonl").read_text().splitlines(keepends=True)[:3]))
    cfg = EvalConfig(
        model_name_or_path="m", dataset=str(dataset), output_dir=str(tmp_path / "e"), reward=["rule:arithmetic"]
    )
    summary = run_eval(cfg, engine=Engine())["summary"]
    assert (summary["engine"], summary["sampler"], summary["num_prompts"]) == ("vllm", "vllm", 3)


# -- 3. mixed precision ------------------------------------------------------------------------


def test_bf16_mixed_precision_keeps_fp32_master_weights_for_a_full_fine_tune():
    from align.training.models import ModelOptions, trainable_dtype

    opts = types.SimpleNamespace(
        **{f: getattr(ModelOptions, f, None) for f in ()},
        dtype="bfloat16",
        use_lora=False,
        load_in_4bit=False,
        bf16=True,
    )
    assert trainable_dtype(opts) == torch.float32
    assert trainable_dtype(types.SimpleNamespace(**{**vars(opts), "use_lora": True})) == torch.bfloat16  # frozen base
    assert trainable_dtype(types.SimpleNamespace(**{**vars(opts), "bf16": False})) == torch.bfloat16
    assert trainable_dtype(types.SimpleNamespace(**{**vars(opts), "bf16": None}), bf16=True) == torch.float32


def test_rlhf_splits_the_engine_dtype_from_the_policy_and_defaults_by_device():
    from align.stages.rlhf import resolve_bf16, resolve_engine_dtype, resolve_importance_sampling

    assert resolve_bf16(None, "cpu", False) is False and resolve_bf16(None, "cuda", True) is True
    assert resolve_bf16(None, "cuda", False) is False and resolve_bf16(True, "cpu", False) is True
    assert resolve_engine_dtype(None, "float32", "cpu", False) == "float32"
    assert resolve_engine_dtype(None, "float32", "cuda", True) == "bfloat16"
    assert resolve_engine_dtype(None, "float32", "cuda", False) == "float16"  # before Ampere
    assert resolve_engine_dtype("float32", "bfloat16", "cuda", True) == "float32"
    assert resolve_importance_sampling(None, "grpo", "bfloat16", torch.float32) is True
    assert resolve_importance_sampling(None, "grpo", "float32", torch.float32) is False
    assert resolve_importance_sampling(None, "mdloo", "bfloat16", torch.float32) is False
    assert resolve_importance_sampling(None, "grpo", "auto", torch.float32) is False


@pytest.fixture
def gpu(monkeypatch):
    """Pretend torch sees a CUDA GPU of compute capability (major, 0): ``gpu(8)`` an Ampere,
    ``gpu(7)`` a V100/T4, on which torch's is_bf16_supported() still says yes (emulation)."""

    def pretend(major: int | None):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: major is not None)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 0))
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)

    return pretend


def test_a_trainers_unset_precision_follows_the_device_and_explicit_values_win(gpu):
    from align.training.trainer import resolve_mixed_precision as precision

    none, bf16, fp16 = {"bf16": False, "fp16": False}, {"bf16": True, "fp16": False}, {"bf16": False, "fp16": True}
    gpu(None)
    assert precision(None, "cpu") == none and precision(None, "cuda") == none  # no GPU to be found
    assert precision(True, "cpu") == bf16 and precision(False, "cpu") == none
    gpu(8)
    assert precision(None, "cuda") == bf16 and precision(None, "cpu") == none
    assert precision(False, "cuda") == none
    gpu(7)  # before Ampere: fp16 autocast, though torch would emulate bf16
    assert precision(None, "cuda") == fp16 and precision(True, "cuda") == bf16 and precision(False, "cuda") == none


def sft_config(**options):
    from align.stages.sft import SFTConfig

    return SFTConfig(model_name_or_path="m", dataset="d", output_dir="o", **options)


def test_the_trl_arguments_and_loaded_dtype_follow_the_resolved_precision(gpu, tmp_path):
    from align.core.stage_dir import Stage
    from align.training.models import trainable_dtype
    from align.training.trainer import trl_args

    def precision(cfg):
        args = trl_args(cfg, Stage("sft", cfg, tmp_path))
        return args["bf16"], args["fp16"], args["use_cpu"], trainable_dtype(cfg)

    gpu(8)
    # on CPU exactly as before: no mixed precision, the weights in dtype
    assert precision(sft_config(device="cpu")) == (False, False, True, torch.float32)
    assert precision(sft_config(device="cpu", dtype="bfloat16")) == (False, False, True, torch.bfloat16)
    assert precision(sft_config(device="cpu", bf16=True)) == (True, False, True, torch.float32)
    assert precision(sft_config(dtype="bfloat16")) == (True, False, False, torch.float32)  # fp32 master weights
    assert precision(sft_config(dtype="bfloat16", use_lora=True)) == (True, False, False, torch.bfloat16)
    gpu(7)
    assert precision(sft_config(dtype="float16")) == (False, True, False, torch.float32)  # fp16 grads cannot unscale
    assert precision(sft_config(dtype="float16", bf16=False)) == (False, False, False, torch.float16)


def test_an_unset_bf16_on_cpu_keeps_the_identity_of_bf16_false(gpu):
    gpu(None)
    assert sft_config().identity() == sft_config(bf16=False).identity()
    assert sft_config().identity()["bf16"] is False
    gpu(8)
    assert sft_config().identity()["bf16"] is None  # unset on a GPU: its own value


def test_dpos_reference_cache_key_names_the_resolved_precision(gpu, tiny_model):
    from align.stages.dpo import DPOConfig, _reference_identity

    def key(**options):
        cfg = DPOConfig(model_name_or_path=str(tiny_model), dataset="d", output_dir="o", **options)
        return _reference_identity(cfg, [])

    gpu(None)
    assert key() == key(bf16=False) and key()["bf16"] is False and "fp16" not in key()  # the CPU key as it was
    gpu(8)
    assert key()["bf16"] is True and "fp16" not in key()
    gpu(7)
    assert (key()["bf16"], key()["fp16"]) == (False, True)


def test_rlhf_counts_only_ampere_or_newer_as_having_bf16(gpu):
    from align.stages.rlhf import resolve_engine_dtype
    from align.training.models import cuda_has_bf16

    gpu(8)
    assert cuda_has_bf16() and resolve_engine_dtype(None, "float32", "cuda", cuda_has_bf16()) == "bfloat16"
    gpu(7)
    assert not cuda_has_bf16() and resolve_engine_dtype(None, "float32", "cuda", cuda_has_bf16()) == "float16"
    gpu(None)
    assert not cuda_has_bf16()


def test_autocast_runs_the_fp32_policy_in_bf16_and_steps_fp32_weights():
    from align.stages.rlhf import autocast

    layer = torch.nn.Linear(4, 4)
    with autocast(True, "cpu"):
        y = layer(torch.randn(2, 4))
    assert y.dtype == torch.bfloat16 and layer.weight.dtype == torch.float32
    with autocast(False, "cpu"):
        assert layer(torch.randn(2, 4)).dtype == torch.float32


def test_truncated_importance_sampling_weights_on_hand_built_logprobs():
    from align.rl.losses import clipped_surrogate, truncated_is_weights

    trainer = torch.tensor([[-1.0, -2.0, -0.5, 0.0]])
    engine = torch.tensor([[-1.5, -1.0, -0.5 - 2.0, 7.0]])  # the last is padding
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = truncated_is_weights(trainer, engine, mask, cap=3.0)
    expected = torch.tensor(
        [[torch.exp(torch.tensor(0.5)), torch.exp(torch.tensor(-1.0)), 3.0, 1.0]]
    )  # e^2 > 3: capped
    assert torch.allclose(w, expected)
    seq = truncated_is_weights(trainer, engine, mask, cap=3.0, per_sequence=True)
    assert torch.allclose(seq, torch.tensor([3.0]))  # e^(0.5 - 1 + 2) = e^1.5 > 3
    assert torch.allclose(
        truncated_is_weights(trainer, engine, mask, cap=10.0, per_sequence=True), torch.exp(torch.tensor([1.5]))
    )
    # in the loss: each token's term times its weight, averaged over the response tokens (ratio 1 at pi_old)
    adv = torch.tensor([[2.0, 2.0, 2.0, 2.0]])
    loss, _ = clipped_surrogate(trainer, trainer, adv, mask, 0.2, w)
    assert torch.isclose(loss, -(2.0 * (w[0, :3])).sum() / 3)
    plain, _ = clipped_surrogate(trainer, trainer, adv, mask, 0.2)
    assert torch.isclose(plain, torch.tensor(-2.0))


def test_rollouts_carry_the_engine_logprobs_where_the_mask_marks_the_response():
    from align.rl.rollout import build_rollouts

    r = build_rollouts(
        [[1, 2]], [[[3, 4], [5]]], [[False, True]], [1.0, 0.0], 0, engine_logprobs=[[[-0.1, -0.2], [-0.3]]]
    )
    assert torch.allclose(r.logp_engine, torch.tensor([[0.0, -0.1, -0.2], [0.0, -0.3, 0.0]]))
    assert torch.equal(r.logp_engine != 0, r.mask.bool())
    assert build_rollouts([[1, 2]], [[[3, 4], [5]]], [[False, True]], [1.0, 0.0], 0).logp_engine is None


# -- 4. placement before process groups --------------------------------------------------------


class FakeModel:
    def __init__(self, kwargs):
        self.kwargs, self.moves = kwargs, []

    def to(self, device):
        self.moves.append(str(device))
        return self


@pytest.fixture
def loaded(monkeypatch):
    import transformers

    from align.training import models

    monkeypatch.setattr(
        transformers.AutoModelForCausalLM, "from_pretrained", staticmethod(lambda path, **kw: FakeModel(kw))
    )
    monkeypatch.setattr(models, "resolve_model_path", lambda name: name)

    def load(device="cuda", world="2", local_rank="1", **opts):
        monkeypatch.setenv("WORLD_SIZE", world)
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        base = dict(model_name_or_path="m", device=device)
        return models.load_causal_lm(models.ModelOptions(**{**base, **opts}))

    return load


def test_no_model_goes_to_cuda_before_the_trainer_places_it(loaded):
    model = loaded()
    assert model.moves == [] and "device_map" not in model.kwargs


def test_a_4bit_model_loads_onto_its_own_processes_gpu(loaded, monkeypatch):
    import transformers

    monkeypatch.setattr(transformers, "BitsAndBytesConfig", lambda **kw: kw)
    model = loaded(load_in_4bit=True)
    assert model.kwargs["device_map"] == {"": 1} and model.moves == []


def test_on_cpu_the_model_is_placed_as_before(loaded):
    assert loaded(device="cpu", world="1", local_rank="0").moves == ["cpu"]


@pytest.mark.parametrize(
    "options,moves",
    [
        (dict(device="cpu"), ["cpu"]),  # no accelerate placement on CPU: moved there now
        (dict(device="cuda"), []),  # the Trainer puts it on this process's GPU once the process group exists
        (dict(device="cuda", load_in_4bit=True), []),  # loaded onto its GPU; a 4-bit model cannot move
        (dict(device="cpu", load_in_4bit=True), []),
    ],
)
def test_place_for_trainer_moves_a_host_model_only_where_no_trainer_will(options, moves):
    from align.training.models import ModelOptions, place_for_trainer

    model = FakeModel({})
    assert place_for_trainer(model, ModelOptions(model_name_or_path="m", **options)) is model
    assert model.moves == moves


# -- 5. sleep mode -----------------------------------------------------------------------------


def test_sleep_and_wake_calls_come_in_order_around_sync_and_generate(fake_cuda_engine):
    from sampling.base import SamplingParams

    engine, calls = fake_cuda_engine(enable_sleep_mode=True)
    assert engine.llm.kwargs["enable_sleep_mode"] is True
    with pytest.raises(RuntimeError, match="load_weights"):
        engine.generate([[{"role": "user", "content": "1+1"}]], SamplingParams(max_tokens=2))
    calls.clear()
    engine.load_weights([("w", torch.zeros(1))])
    engine.generate([[{"role": "user", "content": "1+1"}]], SamplingParams(max_tokens=2))
    engine.load_weights([("w", torch.zeros(1))])
    assert calls == [
        ("wake_up", ("weights",)),
        ("collective_rpc", "reload_weights"),
        ("reset_prefix_cache",),
        ("wake_up", ("kv_cache",)),
        ("generate", None),
        ("sleep", 2),
        ("wake_up", ("weights",)),
        ("collective_rpc", "reload_weights"),
        ("reset_prefix_cache",),
    ]


class SleepingLLM(FakeLLM):
    """FakeLLM with vLLM's sleep-mode memory states: a level-2 sleep discards the weights (level 1
    keeps them in host memory) and the KV cache; waking discarded weights maps memory without
    their values, which only ``reload_weights`` puts back; generating needs both awake and loaded."""

    def __init__(self, calls, **kwargs):
        super().__init__(calls, **kwargs)
        self.weights, self.kv_cache = "loaded", "awake"
        self.llm_engine.engine_core = types.SimpleNamespace(shutdown=lambda: calls.append(("shutdown",)))

    def sleep(self, level):
        super().sleep(level)
        self.weights, self.kv_cache = ("discarded" if level == 2 else "offloaded"), "discarded"

    def wake_up(self, tags):
        super().wake_up(tags)
        if "weights" in tags:
            self.weights = "loaded" if self.weights == "offloaded" else "unset"
        if "kv_cache" in tags:
            self.kv_cache = "awake"

    def collective_rpc(self, method, kwargs=None):
        if method == "reload_weights":
            assert self.weights != "discarded", "reload_weights into memory sleep freed"
            self.weights = "loaded"
        return super().collective_rpc(method, kwargs)

    def generate(self, prompts, params, use_tqdm=False, lora_request=None):
        assert (self.weights, self.kv_cache) == ("loaded", "awake"), f"generate with weights {self.weights}"
        self.calls.append(("generate", len(prompts)))
        return [
            types.SimpleNamespace(
                outputs=[
                    types.SimpleNamespace(index=i, token_ids=[5], text="x", finish_reason="stop", logprobs=None)
                    for i in range(p.n)
                ]
            )
            for p in params
        ]


def test_every_generate_of_an_rlhf_run_in_sleep_mode_finds_its_weights(
    fake_cuda_engine, monkeypatch, tiny_model, demo_data, tmp_path
):
    """Evaluation before, monitor points at 0, 2 and 3, three iterations, evaluation after: a full
    fine-tune's engine sleeps at level 2 after each generate, so each generate must follow a reload
    of the weights since the last sleep (SleepingLLM fails the run otherwise)."""
    from align.stages.rlhf import RLHFConfig, run_rlhf

    def first_lines(name, n):
        path = tmp_path / name
        path.write_text("".join((demo_data / name).read_text().splitlines(keepends=True)[:n]))
        return str(path)

    built = []

    def build_engine(self, model_path, **options):
        engine, calls = fake_cuda_engine(
            llm=SleepingLLM, ranks=RankInfo(0, 0, 1), enable_sleep_mode=options["enable_sleep_mode"]
        )
        built.append(calls)
        return engine

    monkeypatch.setattr(RLHFConfig, "build_engine", build_engine)
    prompts, held_out = first_lines("prompts.jsonl", 8), first_lines("test.jsonl", 4)
    out = run_rlhf(
        RLHFConfig(
            model_name_or_path=str(tiny_model),
            dataset=prompts,
            eval_dataset=held_out,
            monitor_dataset=held_out,
            monitor_max_prompts=2,
            monitor_every=2,
            reward=["rule:arithmetic"],
            output_dir=str(tmp_path / "rl"),
            optimizer="grpo",
            num_iterations=3,
            prompts_per_iteration=2,
            num_samples=2,
            max_tokens=4,
            max_model_len=128,
            engine="vllm",
            sleep_mode=True,
        )
    )
    (calls,) = built
    generates = [c[1] for c in calls if c[0] == "generate"]
    # eval before (4 prompts), monitor 0 (2), iteration 1, 2 (2 each), monitor 2, iteration 3, monitor 3, eval after
    assert generates == [4, 2, 2, 2, 2, 2, 2, 4]
    loaded = False  # the engine sleeps as soon as it is built
    for call in calls:
        if call[0] == "sleep":
            assert call == ("sleep", 2)  # full weights: discarded
            loaded = False
        elif call == ("collective_rpc", "reload_weights"):
            loaded = True
        elif call[0] == "generate":
            assert loaded, calls
    assert out["summary"]["monitor_points"] == 3 and "eval_mean_reward" in out["summary"]


def test_sleep_mode_is_refused_on_cpu():
    with pytest.raises(ConfigError, match="sleep_mode"):
        engine_kwargs("m", device="cpu", enable_sleep_mode=True, **BASE)


def rlhf_config(**options):
    from align.stages.rlhf import RLHFConfig

    return RLHFConfig(model_name_or_path="m", dataset="d", output_dir="o", reward=["rule:arithmetic"], **options)


def test_rlhf_refuses_sleep_mode_on_cpu_when_the_config_is_validated():
    with pytest.raises(ConfigError) as err:
        rlhf_config(sleep_mode=True, device="cpu").validate()
    assert str(err.value) == vllm_engine.SLEEP_MODE_NEEDS_GPU


@pytest.mark.parametrize("engine", ["transformers", "auto"])
def test_rlhf_refuses_sleep_mode_with_the_transformers_engine(monkeypatch, engine):
    from sampling import engines

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # past the CPU refusal
    monkeypatch.setattr(engines, "default_engine", lambda: "transformers")  # auto without vLLM
    with pytest.raises(ConfigError, match="transformers engine") as err:
        rlhf_config(sleep_mode=True, engine=engine).validate()
    assert "\n" not in str(err.value)
    monkeypatch.setattr(engines, "default_engine", lambda: "vllm")
    rlhf_config(sleep_mode=True).validate()


# -- 6. adapter-only LoRA syncs ----------------------------------------------------------------


def test_a_lora_policy_on_a_gpu_syncs_only_its_adapter(tiny_model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from align.stages.rlhf import weight_sync_mode

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    assert weight_sync_mode("cuda", base) == "full"
    lora = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    assert weight_sync_mode("cuda", lora) == "adapter"
    assert weight_sync_mode("cpu", lora) == "merged"
    assert weight_sync_mode("cuda", lora, engine="transformers") == "merged"
    lm_head = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(tiny_model)),
        LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"], task_type="CAUSAL_LM"),
    )
    assert weight_sync_mode("cuda", lm_head) == "merged"  # the fallback vLLM's LoRA cannot load


def test_an_adapter_sync_saves_the_adapter_and_generates_with_a_new_lora_request(
    fake_cuda_engine, tiny_model, tmp_path
):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from align.stages.rlhf import sync_engine
    from sampling.base import SamplingParams

    engine, calls = fake_cuda_engine(max_lora_rank=4)
    assert (engine.llm.kwargs["enable_lora"], engine.llm.kwargs["max_lora_rank"]) == (True, 4)
    policy = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(tiny_model)),
        LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    for _ in range(2):
        sync_engine(engine, policy, tmp_path / "adapter")
        engine.generate([[{"role": "user", "content": "1+1"}]], SamplingParams(max_tokens=2))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert [c for c in calls if c[0] in ("collective_rpc", "generate")] == [
        ("generate", 1),
        ("generate", 2),
    ]  # no full reload


# -- 7. refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize("key,name", [("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"), ("ACCELERATE_USE_FSDP", "FSDP")])
def test_rlhf_under_zero_or_fsdp_is_refused_in_one_line(monkeypatch, key, name):
    from align.stages.rlhf import RLHFConfig

    monkeypatch.setenv(key, "true")
    with pytest.raises(ConfigError, match=name) as err:
        RLHFConfig(model_name_or_path="m", dataset="d", output_dir="o", reward=["rule:arithmetic"]).validate()
    assert "\n" not in str(err.value)


def test_importance_sampling_is_refused_for_optimizers_without_a_ratio():
    from align.stages.rlhf import RLHFConfig

    with pytest.raises(ConfigError, match="importance_sampling"):
        RLHFConfig(
            model_name_or_path="m",
            dataset="d",
            output_dir="o",
            reward=["rule:arithmetic"],
            optimizer="mdloo",
            importance_sampling=True,
        ).validate()


# -- 8. install --------------------------------------------------------------------------------


def test_the_gpu_install_checks_for_cuda_torch_and_keeps_cuda_vllms_dependencies():
    setup = (ROOT / "scripts/setup.sh").read_text()
    gpu, cpu = setup.split('*",gpu,"* ]]; then', 1)[1].split("\nelse\n", 1)
    assert "torch.version.cuda" in gpu
    assert "uninstall -q -y torchvision" not in gpu  # torchvision/torchaudio stay for CUDA vLLM
    assert "uninstall -q -y torchvision" in cpu.split("\nfi\n", 1)[0]
    readme = (ROOT / "README.md").read_text()
    block = readme.split("### GPU install", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    assert "torch.version.cuda" in block and "ALIGN_EXTRAS=gpu" in block and "gpu_smoke.sh" in block


# -- 9. the GPU smoke script -------------------------------------------------------------------


def test_the_gpu_smoke_script_parses_and_names_every_check():
    script = ROOT / "scripts/gpu_smoke.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    for check in (
        "rs vllm",
        "rlhf grpo",
        "for mode in full lora",
        "enforce_eager",
        "sft bf16",
        "dpo bf16",
        "qlora sft",
        "rs committee",
    ):
        assert check in text, check


def test_the_smoke_scripts_adapter_probe_wraps_the_weights_its_engine_loads():
    """The adapter-only engine loads the base from disk; the LoRA policy it is compared with must
    wrap those weights, not the full-weights probe's nudged ones."""
    probe = (ROOT / "scripts/gpu_smoke.sh").read_text().split("<<'PYEOF'", 1)[1].split("PYEOF", 1)[0]
    nudged, lora_half = probe.split("engine.close()", 1)
    assert "p.add_(torch.randn_like(p)" in nudged and "get_peft_model(policy" not in probe
    assert "AutoModelForCausalLM.from_pretrained(path" in lora_half.split("get_peft_model(", 1)[0]
    assert "max_lora_rank=8" in lora_half


def test_the_smoke_scripts_sleep_mode_run_evaluates_and_monitors():
    text = (ROOT / "scripts/gpu_smoke.sh").read_text()
    sleep_run = text.split('check "rlhf grpo full sleep_mode', 1)[1].split("\n\n", 1)[0]
    assert "--sleep_mode true" in sleep_run and "--eval_dataset" in sleep_run and "--monitor_dataset" in sleep_run
