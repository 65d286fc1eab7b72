#!/bin/bash
# One sitting on the lent GPU machine (docs/gpu.md says how to get there): the GPU tests, the
# real CUDA fault's own words, and the benchmarks, each under a timeout so that one hang
# cannot take the whole run. Run from the checkout after the last staged part is unpacked;
# everything worth keeping goes under $OUT.
set -o pipefail
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
nvidia-smi -L | tee "$OUT/nvidia-smi.txt"

# What the tests assert on, printed whole: ONNX Runtime's text for the real fault.
timeout -k 5 45 python3 -c "
import onnxruntime as ort, engines.cuda as c
print('onnxruntime', ort.__version__, ort.get_available_providers())
print(c.device_info(0))
from tests.test_gpu import break_the_device_and_report as run
run('/tmp/trtserve-probe')
" 2>&1 | tee "$OUT/cuda-fault-probe.txt"
echo "probe rc=$?"

timeout -k 10 200 python3 -m pytest -m gpu -q -rs tests/ 2>&1 | tee "$OUT/gpu-tests.log"
echo "gpu tests rc=$?"

timeout -k 10 250 python3 -m deployments.cli bench serve --model resnet50 --backend onnxruntime \
  --gpus-per-replica 0.5 --callers 1 16 --requests 1000 --rounds 5 \
  --plot "$OUT/bench-serve-gpu.png" | tee "$OUT/bench-serve-gpu.txt"
echo "bench serve rc=$?"

timeout -k 5 60 python3 -m deployments.cli bench swap --model resnet50 --backend onnxruntime \
  --trials 50 | tee "$OUT/bench-swap-gpu.txt"
echo "bench swap rc=$?"
