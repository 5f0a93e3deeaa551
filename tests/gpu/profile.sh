#!/usr/bin/env bash
# Where a CUDA decode step's time goes (tests/gpu/kernels.py): kernels per step and their time for
# our fp16 and int4 folders and onnxruntime-genai's builds of the same weights, then the bare
# graph step under variants. run.sh ends with it; alone, it builds what is missing. Same
# requirements and variables as run.sh (OUT, MODELS, LLAMAONNX_GGUF, PYTHON).
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
OUT=${OUT:-build/gpu}
M=${MODELS:-build/gpu-models}
mkdir -p "$OUT" "$M"
llamaonnx() { $PY -m runtime.cli "$@"; }
SRC=(); [ -n "${LLAMAONNX_GGUF:-}" ] && SRC=("$LLAMAONNX_GGUF")
[ -f "$M/ort-fp32/model.onnx" ] || llamaonnx export "${SRC[@]}" "$M/ort-fp32" --target ort --no-verify
[ -f "$M/ort-fp16/model.onnx" ] || llamaonnx quantize "$M/ort-fp32" "$M/ort-fp16" --precision fp16 \
    --for-provider cuda --no-verify
[ -f "$M/ort-int4/model.onnx" ] || llamaonnx quantize "$M/ort-fp32" "$M/ort-int4" --precision int4 \
    --for-provider cuda --fp16-activations --no-verify
folders=("$M/ort-fp16" "$M/ort-int4")
if $PY -c "import onnxruntime_genai" 2>/dev/null; then
    [ -f "$M/hf/config.json" ] || llamaonnx hf-folder "${SRC[@]}" "$M/hf"
    for p in fp16 int4; do
        [ -f "$M/genai-cuda-$p/genai_config.json" ] || $PY -m onnxruntime_genai.models.builder \
            -i "$M/hf" -o "$M/genai-cuda-$p" -p "$p" -e cuda -c "$M/genai-cache" \
            > "$OUT/genai-build-$p.log" 2>&1
        [ -f "$M/genai-cuda-$p/genai_config.json" ] && folders+=("$M/genai-cuda-$p")
    done
fi
$PY tests/gpu/kernels.py "$OUT/kernels.json" "${folders[@]}" 2>&1 | tee "$OUT/kernels.txt"
