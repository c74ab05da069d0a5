#!/usr/bin/env bash
# Train the shipped fmnist-dit on a GPU machine that has torch, numpy and safetensors but not
# diffusers. Run from the repository root:
#   OUT=/some/folder bash benchmarks/train_fmnist_device.sh [STEPS [more train-default flags]]
# Carried (git-ignored) folders: .devdata/fashion-mnist/ (the four Fashion-MNIST idx files, as in
# /usr/share/datasets/fashion-mnist/) and .whl/ (a diffusers wheel plus any of its requirements
# missing there; torchao is not needed and not installed). The DiT's sample check classifies 100
# samples with the classifier shipped in ptqbench/assets.
# Writes to $OUT (4 files): fmnist_dit.safetensors (fp16, ~14 MB), fmnist_dit_train.json,
# fmnist_dit_samples.png, train.log.
set -euo pipefail
: "${OUT:?set OUT to the output folder}"
STEPS="${1:-6000}"
shift || true
wheels=()
for w in .whl/*.whl; do
  [[ -e "$w" && "$(basename "$w")" != torchao-* ]] && wheels+=("$w")
done
if ((${#wheels[@]})); then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}"
  export PYTHONPATH="/tmp/site"
fi
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"; } | tee "$OUT/train.log"
python3 -m ptqbench train-default --data .devdata/fashion-mnist --out "$OUT" --steps "$STEPS" \
  --device cuda --seed 0 --only dit "$@" 2>&1 | tee -a "$OUT/train.log"
