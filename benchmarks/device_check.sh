#!/usr/bin/env bash
# The GPU path in one go, on one CUDA device (H100 / H200), in under 5 minutes:
#   1. the CUDA-only tests (views on the device, the probe on the device in fp32 and bf16, a
#      compiled model);
#   2. a full probe of a random-init timm ViT-B/16 at 224 px (512 points x 10 views, through f and
#      g, all 12 blocks x 4 points + all MLP units) against the bare forward passes of the same
#      views, in fp32 (TF32) and in bf16: ratios and images/s;
#   3. the full 5,000-point probe in bf16, wall time.
# Goals (issue 12): probe <= 1.15x the bare forwards; the 5,000-point probe <= 30 s.
#   bash benchmarks/device_check.sh            (from the repository root, memsurgery installed)
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'device_check.sh: no CUDA device')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
echo "== 1. CUDA-only tests"
timeout 150 python -m pytest -q -p no:cacheprovider tests/test_views.py tests/test_probe_backends.py -k "cuda" -rs
echo "== 2-3. ViT-B/16 probe against the bare forwards"
timeout 240 python benchmarks/bench_probe_gpu.py --points 512 --full 5000 --repeats 3
