#!/usr/bin/env bash
# GGUF K-quant blocks in the CUDA form, checked on the provider (the GGUF blocks issue):
#   1. a small llama whose tensors mix every carried type as a Q4_K_M file does
#      (tests/gguf_writer.py, MIXED_TYPES), each kept as its own type in MatMulNBits (5- and 6-bit
#      codes in 8-bit containers, Q6_K in blocks of 16): quantized for CUDA (fp16 activations),
#      verified on the provider -> quality-kquants.md, report-kquants-int4.json;
#   2. with KQUANT_GGUF=/path/to/model.Q4_K_M.gguf, that real file the same way, beside an fp16
#      CUDA folder of the same dequantized weights -> quality-q4km.md, report-q4km-*.json,
#      bench-q4km-PROVIDER.{txt,md,json} (batch-1 decode, plain and with CUDA graphs) and steps-q4km.{txt,json}
#      (graph tokens against plain decode);
#   and for each, placement-*.json (tests/gpu/placement.py): the nodes onnxruntime left on the CPU,
#   and parity-*.{txt,json} (tests/gpu/parity.py): CPU against CUDA per decode step and per node.
# Every block keeps its codes; float16 rounds Q4_K's, Q5_K's and Q6_K's scales
# (report.json: fp16_rounded_scales). run.sh runs this too; same requirements and variables
# (OUT, MODELS, PYTHON, PROVIDERS, RUNS). PROVIDERS=cpu rehearses it without a GPU.
source "$(dirname "$0")/common.sh"

# carry NAME FP32_FOLDER: the int4 CUDA form (fp16 activations and cache: onnxruntime's CUDA
# attention has no float32), verified on the provider; ok: the folder if it verified.
carry() {
    local name=$1 src=$2
    ok=() made=()
    try llamaonnx quantize "$src" "$M/$name-int4" --precision int4 --for-provider cuda \
        --force --no-verify || return
    made+=("$M/$name-int4")
    step "verify $name int4 on $VERIFY"
    try llamaonnx verify "$M/$name-int4" --provider "$VERIFY" > "$OUT/verify-$name.log" \
        && ok+=("$M/$name-int4")
    cp "$M/$name-int4/report.json" "$OUT/report-$name-int4.json" 2>/dev/null
}

# compare NAME FOLDER…: where onnxruntime places each folder's nodes, and the CPU against the
# provider per decode step and per MatMulNBits → $OUT/placement-NAME.json, parity-NAME.{txt,json}
compare() {
    local name=$1
    shift
    try env PROVIDER="$VERIFY" $PY tests/gpu/placement.py "$OUT/placement-$name.json" "$@"
    step "parity $name: CPU against $VERIFY, per decode step and per MatMulNBits"
    try env PROVIDER="$VERIFY" $PY tests/gpu/parity.py "$OUT/parity-$name.json" "$@" \
        > >(tee "$OUT/parity-$name.txt")
}

step "GGUF K-quant mix: the CUDA form verified on $VERIFY"
K=$M/kquants
if try $PY -c "import sys; from pathlib import Path; from tests.gguf_writer import write_mixed; \
        write_mixed(Path(sys.argv[1]))" "$K" \
    && try llamaonnx export "$K/mixed.gguf" "$M/kquants-fp32" --target ort --force --no-verify; then
    carry kquants "$M/kquants-fp32"
    [ ${#ok[@]} -gt 0 ] && try llamaonnx table "${ok[@]}" > >(tee "$OUT/quality-kquants.md")
    [ ${#made[@]} -gt 0 ] && compare kquants "${made[@]}"
fi

if [ -n "${KQUANT_GGUF:-}" ]; then
    step "real file $KQUANT_GGUF: export"
    if try llamaonnx export "$KQUANT_GGUF" "$M/q4km-fp32" --target ort --force --no-verify; then
        try llamaonnx quantize "$M/q4km-fp32" "$M/q4km-fp16" --precision fp16 --for-provider cuda \
            --force --no-verify
        carry q4km "$M/q4km-fp32"
        [ ${#ok[@]} -gt 0 ] && try llamaonnx table "${ok[@]}" > >(tee "$OUT/quality-q4km.md")
        folders=(); for d in "$M/q4km-fp16" "${made[@]}"; do [ -f "$d/model.onnx" ] && folders+=("$d"); done
        compare q4km "${folders[@]}"
        bench_each bench-q4km "${folders[@]}"
        step "decode steps: graph tokens against plain"
        [[ "$PROVIDERS" == *cuda* ]] || export PROVIDER=cpu
        try $PY tests/gpu/steps.py "$OUT/steps-q4km.json" "${made[@]}" > >(tee "$OUT/steps-q4km.txt")
    fi
fi
step "k-quants done"
if [ ${#failed[@]} -gt 0 ]; then
    printf '!! failed: %s\n' "${failed[@]}"
    exit 1
fi
