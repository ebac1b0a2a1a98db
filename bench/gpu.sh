#!/usr/bin/env bash
# The GPU benchmark, prepared to run as is on a CUDA machine from the repository root:
#
#     make setup            # or: python -m venv .venv && .venv/bin/pip install <your CUDA torch> && pip install -e .
#     bash bench/gpu.sh     # about 5-10 minutes on one 80 GB GPU
#
# For each family ft can train, `ft train` itself (bench/gpu_step.py): the real-size transformer with random weights
# (saved to a temp folder first: ~11 GB for CogVideoX-5b), LoRA rank 128, batch 1, gradient checkpointing, bf16,
# fed by synthetic shards of the real shapes. Prints
# peak memory allocated/reserved and s/step beside finetrainers' published number (CogVideoX-5b LoRA: 20.7 GB max
# reserved with precomputation; our target is at least 10% under), and writes bench/results/gpu-*.md.
# A family whose ModelSpec does not exist yet (LTX-Video, HunyuanVideo) is skipped with a note; adding the family
# makes its line run. On a machine without a GPU, `bash bench/gpu.sh --check` runs the same script's CPU checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1  # PyTorch's default CUDA allocator unless PYTORCH_CUDA_ALLOC_CONF is set by the caller

RUNS=(
  "cogvideox THUDM/CogVideoX-5b 49x480x720 gpu-cogvideox-5b"
  "ltx-video Lightricks/LTX-Video 49x512x768 gpu-ltx-video"
)

has_spec() { "$PY" -c "import sys; from ft.pipelines.registry import SPECS; sys.exit($1 not in SPECS)" 2>/dev/null; }

if [[ "${1:-}" == "--check" ]]; then  # no GPU: the tiny model end to end, and the real-size shards without a model
  "$PY" bench/gpu_step.py --tiny --device cpu
  for run in "${RUNS[@]}"; do
    read -r model pretrained bucket _ <<<"$run"
    if has_spec "'$model'"; then
      "$PY" bench/gpu_step.py --model "$model" --pretrained "$pretrained" --bucket "$bucket" --samples 2 --dry-run
    else
      echo "skip $model: no ModelSpec yet"
    fi
  done
  exit 0
fi

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench/gpu.sh needs a CUDA GPU (--check runs the CPU checks)')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
for run in "${RUNS[@]}"; do
  read -r model pretrained bucket name <<<"$run"
  if ! has_spec "'$model'"; then
    echo "skip $model: no ModelSpec yet"
    continue
  fi
  "$PY" bench/gpu_step.py --model "$model" --pretrained "$pretrained" --bucket "$bucket" --rank 128 \
    --steps 10 --warmup 3 --save "$name"
done
"$PY" bench/memory.py
