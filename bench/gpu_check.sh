#!/usr/bin/env bash
# One GPU call (bench/README.md): GPU kernel tests, headline bench cases (bench/headline.txt), the row-kernel
# probe, the remaining GPU tests; <= ~6 minutes; everything under $OUT/gpu_check/ as it goes.
#   bash bench/gpu_check.sh              # on the GPU machine (device tool)
#   bash bench/gpu_check.sh --dry-run    # anywhere: collects every case, imports everything, runs nothing
# Other arguments go to `python -m bench.gpu_check` (--budget-s, --stages).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi

# Wheels carried in .whl/ (Liger-Kernel; the GPU machine has no network), beside the system packages.
if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi
# fastrlhf is not installed there: kernels/ becomes fastrlhf.kernels through a link (setup.py's package-dir).
if ! $PY -c "import fastrlhf.kernels" 2>/dev/null; then
    ln -sfn ../kernels fastrlhf/kernels
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
$PY -c "import fastrlhf.kernels, torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, \
'cuda', torch.cuda.is_available())" || exit 1
exec $PY -m bench.gpu_check "$@"
