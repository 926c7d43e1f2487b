#!/usr/bin/env bash
# The whole loop on the embedded default: tokenizer + tiny llama -> hg_to_pp -> train at
# pipe=2 on 2 CPU processes -> pp_to_hg -> transformers from_pretrained + generate.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DS=${DS:-.venv/bin/deepspeed}
NPROC=${NPROC:-2}
echo "== 1/5 tokenizer (SentencePiece trained on data/samples/demo.json) and a tiny llama"
$PY scripts/demo_init.py --out demo_out/hf_init
echo "== 2/5 hg_to_pp"
$PY convert_model.py hg_to_pp --input-path demo_out/hf_init --save-path demo_out/pp_init --force --quiet
echo "== 3/5 train: pipe=2 on $NPROC CPU processes"
rm -rf demo_out/ckpt
$DS --num_gpus "$NPROC" train_pp.py --config configs/demo.yml 2>&1 | grep -v -E "^\[[0-9-]+ [0-9:,]+\] \[(INFO|WARNING)\]" || true
test -f demo_out/ckpt/latest || { echo "demo: training did not finish" >&2; exit 1; }
echo "== 4/5 pp_to_hg"
$PY convert_model.py pp_to_hg --input-path demo_out/ckpt --save-path demo_out/hf_trained --force --quiet
echo "== 5/5 transformers from_pretrained + generate"
$PY scripts/demo_generate.py demo_out/hf_trained
$PY - <<'PY'
import json
m = [json.loads(l) for l in open("demo_out/ckpt/metrics.jsonl")]
print(f"loss: step 1 {m[0]['loss']:.3f} -> step {m[-1]['step']} {m[-1]['loss']:.3f}")
PY
echo "demo: done (exported model in demo_out/hf_trained)"
