#!/usr/bin/env bash
# The device call that runs tests/gpu/kquants.sh on a real Q4_K_M file, which is over one call's
# 64 MiB and so travels in parts. Here, once (ignored by git, beside ../shared/gpu/prepare.sh's):
#   mkdir -p .gpuwheels/kq && split -b 58M -d -a 1 models/smollm2-135m-q4_k_m.gguf .gpuwheels/kq/q4km.gguf.
#   (cd .gpuwheels/kq && cat q4km.gguf.* | sha256sum | sed 's/-$/q4km.gguf/' > SHA256)
# Then, between the wheel calls, one call carrying .gpuwheels/kq/q4km.gguf.0 with the command
#   mkdir -p /root/kq && cp .gpuwheels/kq/q4km.gguf.0 /root/kq/
# and last the call carrying the last wheel part, .gpuwheels/kq/q4km.gguf.1 and .gpuwheels/kq/SHA256:
#   bash .gpuwheels/assemble.sh && export PYTHONPATH=/tmp/site && LIMIT=320 bash tests/gpu/kquants-device.sh
# Everything kquants.sh writes comes back as one tarball, $OUT/kq.tgz (a call returns 8 files at most).
set -uo pipefail
cd "$(dirname "$0")/../.."
R=${ROOTDIR:-/root}
mkdir -p "$R/kq" "$R/kqout"
cp .gpuwheels/kq/q4km.gguf.* .gpuwheels/kq/SHA256 "$R/kq/" 2>/dev/null
(cd "$R/kq" && cat q4km.gguf.? > q4km.gguf && sha256sum -c SHA256) || exit 4
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no GPU"
  ${PYTHON:-python3} -c "import onnxruntime as o, torch; print('onnxruntime', o.__version__, \
o.get_available_providers(), '| torch', torch.__version__, '| cuda', torch.version.cuda)"
  lscpu | grep -m1 'Model name'; nproc; } | tee "$R/kqout/gpu.txt"
PYTHONUNBUFFERED=1 OUT=$R/kqout MODELS=$R/kqm KQUANT_GGUF=$R/kq/q4km.gguf RUNS=${RUNS:-5} \
    PROVIDERS=${PROVIDERS:-cuda-graph} timeout "${LIMIT:-400}" bash tests/gpu/kquants.sh 2>&1 \
    | tee "$R/kqout/log"
echo "kquants.sh exit ${PIPESTATUS[0]}"
tar czf "${OUT:-/tmp}/kq.tgz" -C "$R/kqout" .
