#!/usr/bin/env bash
# Set up .venv if needed, then run the main job: the demo task end to end on a tiny model.
# Until the recipe runner lands this is: demo data -> tiny model -> align sft (with held-out eval).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=${1:-runs/quickstart}
.venv/bin/align demo-data "$OUT/data"
[ -f "$OUT/tiny/config.json" ] || .venv/bin/align make-tiny-model "$OUT/tiny"
.venv/bin/align sft --config configs/demo_sft.yaml --model_name_or_path "$OUT/tiny" \
  --dataset "$OUT/data/sft.jsonl" --eval_dataset "$OUT/data/test.jsonl" --output_dir "$OUT/sft"
.venv/bin/python - "$OUT/sft/stage.json" <<'PY'
import json, sys
rec = json.load(open(sys.argv[1]))
s = rec["summary"]
print(f"sft: {s['global_step']} steps, final loss {s['final_loss']:.3f}, "
      f"held-out exact match {s['eval_mean_reward']:.1%} on {s['eval_prompts']} prompts -> {rec['artifacts']['model']}")
PY
