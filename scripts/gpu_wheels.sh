#!/usr/bin/env bash
# Wheels for `make gpu-check` on a GPU machine with torch but no network (Python 3.12, x86-64):
# what ppllm needs beyond such an image (torch, tokenizers, safetensors, sentencepiece, numpy, ... are
# there). Run here, with PyPI reachable; writes .whl/ (git-ignored, about 20 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
PIP="python3 -m pip"
plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
$PIP download -q --no-deps "${plat[@]}" -d .whl \
  transformers==5.23.0 pydantic==2.14.3 annotated-types typing-inspection hjson
# the pydantic-core that pydantic pins
core=$(python3 - <<'PY'
import glob, re, zipfile
w = glob.glob(".whl/pydantic-2*.whl")[0]
meta = next(n for n in zipfile.ZipFile(w).namelist() if n.endswith("METADATA"))
print(re.search(r"Requires-Dist: pydantic-core==([0-9.]+)", zipfile.ZipFile(w).read(meta).decode()).group(1))
PY
)
$PIP download -q --no-deps "${plat[@]}" -d .whl "pydantic-core==$core"
# DeepSpeed ships a source archive only: build its pure-Python wheel here (ops are JIT-built on use)
DS_BUILD_OPS=0 $PIP wheel -q --no-deps -w .whl deepspeed==0.19.8
du -sh .whl; ls .whl
