# Sourced by the GPU check's scripts (run.sh, kquants.sh): the repository root, the variables
# they share (PYTHON, OUT, MODELS, PROVIDERS, RUNS) and the step/try helpers. A failing `try`
# is reported on stderr and remembered in `failed`; the later steps still run.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PY=${PYTHON:-python3}
OUT=${OUT:-build/gpu}
M=${MODELS:-build/gpu-models}
PROVIDERS=${PROVIDERS:-cuda cuda-graph}
RUNS=${RUNS:-10}
VERIFY=cuda; [[ "$PROVIDERS" == *cuda* ]] || VERIFY=cpu  # the CPU side is checked in CI already
mkdir -p "$OUT" "$M"
failed=()
step() { echo "== $(date +%T) $*"; }
try() { "$@" || { echo "!! failed ($?): $*" >&2; failed+=("$*"); return 1; }; }
llamaonnx() { $PY -m runtime.cli "$@"; }
# bench_each PREFIX ARG…: `llamaonnx bench ARG…` (folders, --genai-dir peers) on each of
# PROVIDERS, batch 1, 128-token prompt, 128 new tokens → $OUT/PREFIX-PROVIDER.{txt,md,json}
bench_each() {
    local prefix=$1 provider
    shift
    for provider in $PROVIDERS; do
        step "bench $provider"
        try llamaonnx bench "$@" --provider "$provider" --prompt-tokens 128 --new-tokens 128 \
            --runs "$RUNS" --threads 4 --json "$OUT/$prefix-$provider.json" \
            --markdown "$OUT/$prefix-$provider.md" > >(tee "$OUT/$prefix-$provider.txt")
    done
}
