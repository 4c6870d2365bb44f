#!/usr/bin/env bash
# Device checks for a machine with CUDA GPUs (not run in CI; CI has none). Needs a CUDA build of torch in
# .venv (`make setup` pins the CPU build: reinstall torch from the CUDA wheel index there first).
#   1. the LoRA step benchmark on CUDA bf16, qaft beside a bare HF + PEFT loop (benchmarks/speed.py, part steps);
#   2. the fast test suite on CUDA;
#   3. one ZeRO-2 step when more than one GPU is present.
# Results go to $OUT (the device tool's folder) or benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
.venv/bin/python -c "import torch; assert torch.cuda.is_available(), 'this torch has no CUDA: reinstall it from the CUDA index'"
.venv/bin/python benchmarks/speed.py --parts steps --rounds 3 --out "$out/speed_cuda.json"
.venv/bin/python -m pytest -q -x -m "not slow and not multiprocess and not browser" 2>&1 | tail -5 | tee "$out/test_fast_cuda.txt"
if [ "$(nvidia-smi -L | wc -l)" -gt 1 ]; then
  .venv/bin/accelerate launch --num_processes 2 --use_deepspeed --zero_stage 2 -m qaft.pipeline.cli train configs/smoke.yaml \
    training.max_steps=1 training.output_dir="$out/zero2" --overwrite 2>&1 | tail -5 | tee "$out/zero2.txt"
fi
