#!/usr/bin/env bash
# Issue 23's device check in one run, on a machine with an NVIDIA GPU whose python3 already holds a CUDA PyTorch:
#   1. `pytest -m gpu` (tests/test_gpu.py): CUDA float32 vs CPU float64 similarities of every method, bfloat16 and
#      TF32 with unchanged recalls, one bf16 / fp16 autocast training step of every method, torchrun + NCCL
#      crashing and resuming;
#   2. benchmarks/gpu_eval.py: SCAN and GSMN matrices at the F30K 1K and COCO 5K shapes in float32, TF32 and
#      bfloat16, with peak GPU memory;
#   3. benchmarks/train_step.py --device cuda: training steps (samples/s, peak memory) of VSE-infinity BiGRU, SCAN
#      and HREM at batch 128, in float32 and under bf16 autocast.
# Run from the repository root: `OUT=/some/dir bash scripts/gpu_check.sh`. itmatch is imported from src/ (no install);
# packages the machine lacks (e.g. nltk, whose Treebank tokenizer itmatch uses) must be on PYTHONPATH already.
set -u -o pipefail
out="${OUT:-gpu-check}"
mkdir -p "$out"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" 2>&1 | tee "$out/device.txt"
python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py -rs 2>&1 | tee "$out/pytest_gpu.txt"
python3 benchmarks/gpu_eval.py --out "$out/gpu_eval.json" 2>&1 | tee "$out/gpu_eval.txt"
for amp in none bf16; do
  python3 benchmarks/train_step.py --device cuda --amp "$amp" --methods vse_inf_bigru,scan_t2i,hrem --steps 5 \
    --json "$out/train_step_$amp.json" 2>&1 | tee "$out/train_step_$amp.txt"
done
