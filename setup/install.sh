#!/usr/bin/env bash
# Create .venv in the repository and install the pinned CPU stack plus this package (editable).
#
# torch comes from the CPU wheel (pinned 2.13.0+cpu, never a CUDA build); torchrec's dependency on
# the CUDA `fbgemm-gpu` is satisfied by the metadata-only shim in setup/fbgemm_gpu_shim, which
# depends on `fbgemm-gpu-cpu`. Re-running is cheap: pip skips what is already installed.
#   VENV=path       where to create the environment (default .venv)
#   PYTHON=python3  the interpreter to build it from
#   EXTRA_PIP_ARGS  passed to every pip call (e.g. an --index-url for torch's CPU wheels)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
EXTRA_PIP_ARGS=${EXTRA_PIP_ARGS:-}
stamp="$VENV/.dqrm-setup-stamp"
want=$(cat setup/constraints-cpu.txt pyproject.toml setup/fbgemm_gpu_shim/pyproject.toml | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "setup: $VENV is up to date"
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
# torch first, alone and pinned, so that nothing later can ask for a CUDA build.
"${pip[@]}" install $EXTRA_PIP_ARGS "torch==2.13.0+cpu"
"${pip[@]}" install $EXTRA_PIP_ARGS -c setup/constraints-cpu.txt \
  ./setup/fbgemm_gpu_shim "fbgemm-gpu-cpu==1.8.0" "torchrec==1.8.0" -e ".[dev,report,parquet]"
"${pip[@]}" check
"$VENV/bin/python" - <<'PY'
import torch, fbgemm_gpu, torchrec  # noqa: F401  (import check: fbgemm ops must load)
assert "+cpu" in torch.__version__, f"expected a CPU torch, got {torch.__version__}"
assert hasattr(torch.ops.fbgemm, "FloatToFusedNBitRowwiseQuantizedSBHalf")
print(f"setup: torch {torch.__version__}, torchrec {torchrec.__version__} ready")
from compress.quant import native
try:
    print(f"setup: QAT fake-quant kernels built: {native.build()}")
except native.NativeUnavailable as exc:  # QAT still works, on the slower PyTorch path
    print(f"setup: WARNING: QAT fake-quant kernels not built ({exc}); QAT will be slower")
PY
echo "$want" > "$stamp"
