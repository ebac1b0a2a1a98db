#!/usr/bin/env bash
# The GPU benchmark, prepared to run as is on a CUDA machine from the repository root:
#
#     make setup            # or: python -m venv .venv && .venv/bin/pip install <your CUDA torch> && pip install -e .
#     bash bench/gpu.sh     # planned for under 8 minutes on one 80 GB H100-class GPU (not yet run on one)
#
# For each family, `ft train` itself (bench/gpu_step.py), one row per configuration: the real-size transformer with
# random weights made on the GPU in bf16 and saved once per model to a temp folder (~11 GB for CogVideoX-5b, ~26 GB
# for HunyuanVideo), LoRA rank 128, batch 1, gradient checkpointing, fed by synthetic shards of the real shapes:
#   CogVideoX-5b 49x480x720: LoRA bf16, LoRA fp8 storage; LoRA bf16 again compiled (regional)
#   LTX-Video 49x512x768: LoRA bf16, LoRA fp8, full finetune (bf16); LoRA bf16 again compiled
#   HunyuanVideo 49x512x768: LoRA bf16, LoRA fp8, LoRA fp8 + the fewest --offload-blocks that `ft estimate` says
#   fit a 24 GB card
#   Wan 2.1 1.3B 81x720x1280 (75,600 tokens, the long-sequence row): LoRA bf16 with checkpointing, and with
#   --activation-offload (the context-parallel rows, cp 2 on two GPUs, come with --cp-degree)
# Each row prints as soon as it is measured: peak allocated/reserved, s/step, the first step (and its compile
# time), the share of time waiting for data, ft estimate's peak and finetrainers' published number (LoRA with fp8
# storage: LTX-Video 5 GB, CogVideoX-5b 18 GB, HunyuanVideo 32 GB; CogVideoX-5b bf16 20.7 GB); the tables are
# written to bench/results/gpu-*.md. STEPS and WARMUP (default 3 and 1) set the steps per row.
# On a machine without a GPU, `bash bench/gpu.sh --check` runs every row on the tiny model on the CPU (compile
# left out: gcc compiles inductor's kernels in minutes there; tests/test_bench.py runs it apart) and writes each
# model's real-size shards, printing the flags and estimate of each row.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
STEPS=${STEPS:-3}
WARMUP=${WARMUP:-1}
export HF_HUB_OFFLINE=1  # PyTorch's default CUDA allocator unless PYTORCH_CUDA_ALLOC_CONF is set by the caller

# model|pretrained|bucket|results name|rows|rows measured again compiled
RUNS=(
  "cogvideox|THUDM/CogVideoX-5b|49x480x720|gpu-cogvideox-5b|lora-bf16 lora-fp8|lora-bf16"
  "ltx-video|Lightricks/LTX-Video|49x512x768|gpu-ltx-video|lora-bf16 lora-fp8 full-bf16|lora-bf16"
  "hunyuan_video|hunyuanvideo-community/HunyuanVideo|49x512x768|gpu-hunyuan-video|lora-bf16 lora-fp8 lora-fp8-offload24|"
  "wan|Wan-AI/Wan2.1-T2V-1.3B-Diffusers|49x480x832|gpu-wan-1.3b|lora-bf16 lora-fp8|"
  "wan|Wan-AI/Wan2.1-T2V-1.3B-Diffusers|81x720x1280|gpu-wan-1.3b-long|lora-bf16 lora-bf16-aoff|"
)

if [[ "${1:-}" == "--check" ]]; then  # no GPU: every row on the tiny model, and the real-size shards without a model
  "$PY" bench/gpu_step.py --tiny --device cpu --rows lora-bf16 lora-fp8 lora-fp8-offload24 full-bf16 lora-bf16-aoff
  for run in "${RUNS[@]}"; do
    IFS='|' read -r model pretrained bucket _ rows _ <<<"$run"
    # shellcheck disable=SC2086
    "$PY" bench/gpu_step.py --model "$model" --pretrained "$pretrained" --bucket "$bucket" --samples 2 --dry-run \
      --rows $rows
  done
  exit 0
fi

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench/gpu.sh needs a CUDA GPU (--check runs the CPU checks)')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
for run in "${RUNS[@]}"; do
  IFS='|' read -r model pretrained bucket name rows compiled <<<"$run"
  # shellcheck disable=SC2086
  "$PY" bench/gpu_step.py --model "$model" --pretrained "$pretrained" --bucket "$bucket" --rank 128 \
    --steps "$STEPS" --warmup "$WARMUP" --rows $rows --compile-rows $compiled --save "$name"
done
"$PY" bench/memory.py
