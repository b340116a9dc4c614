#!/usr/bin/env bash
# One call on the GPU machine (bench/README.md): GPU tests, then the whole bench suite in GPU mode,
# results in bench/results/<device>-<date>.{json,md} and, when $OUT is set, copied there.
# Arguments go to `python -m bench.run` (--skip-tests, --only EXPR, --out DIR).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# Wheels carried in .whl/ (Liger-Kernel; the machine has no network), installed beside the system packages.
if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi

# fastrlhf is not installed there: the repo root is importable (python -m), and the top-level kernels/
# folder becomes fastrlhf.kernels through a link in this throwaway copy of the tree (setup.py's package-dir).
if ! $PY -c "import fastrlhf.kernels" 2>/dev/null; then
    ln -sfn ../kernels fastrlhf/kernels
fi
$PY -c "import fastrlhf.kernels, torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, \
'cuda', torch.cuda.is_available())" || exit 1

export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
exec $PY -m bench.run "$@"
