#!/usr/bin/env bash
# On a machine with one GPU: tokens/s, MFU, peak memory and compile time of the 124m and 1b train steps, and the
# LoRA and DPO steps at 124m (bench/gpu.py), appended to bench/RESULTS.md.   bash bench/gpu.sh [gpu.py flags]
#
# It runs from the checkout without installing jaxllm (PYTHONPATH), with the machine's own JAX. Where packages it
# needs are missing, the wheels in .whl/ (bench/gpu_wheels.sh) are installed, without an index, into a temporary
# folder: that is how they get to a machine without network. Where JAX sees no GPU, and this is no --smoke run,
# it installs jaxllm's [gpu] extra (needs network). With $OUT set (the device tool's folder of files that come
# back), the log and the updated bench/RESULTS.md are copied there.
#   bash bench/gpu.sh --smoke        # CPU: the same code paths at tiny shapes, nothing written (about a minute)
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v nvidia-smi >/dev/null; then nvidia-smi -L; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
missing() {
  python3 -c "
import importlib.util
print(' '.join(m for m in ('jax', 'flax', 'optax', 'orbax', 'grain', 'ml_collections', 'sentencepiece',
                         'chatterbot_corpus', 'tensorboardX') if importlib.util.find_spec(m) is None))"
}
if [[ -n "$(missing)" ]] && compgen -G ".whl/*.whl" >/dev/null; then
  site=$(mktemp -d)
  python3 -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:$site"
fi
if [[ -n "$(missing)" ]]; then
  echo "bench/gpu.sh: missing Python packages: $(missing) (bash bench/gpu_wheels.sh here, then carry .whl)" >&2
  exit 1
fi
if [[ " $* " != *" --smoke "* ]] && ! python3 -c "import jax; jax.devices('gpu')" >/dev/null 2>&1; then
  python3 -m pip install -e ".[gpu]"
fi
log=$(mktemp)
status=0
timeout 480 python3 bench/gpu.py --write "$@" 2>&1 | tee "$log" || status=$?
if [[ -n "${OUT:-}" ]]; then cp "$log" "$OUT/gpu.log"; cp bench/RESULTS.md "$OUT/RESULTS.md"; fi
exit "$status"
