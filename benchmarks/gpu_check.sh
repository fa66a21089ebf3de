#!/usr/bin/env bash
# The device check of issue 15: forward-only px/s per model family and precision, parity of the
# precisions, an end-to-end `run` on a generated 1000 x 1000 px tile with 64 scenes on CPU reading
# workers + one GPU worker, GPU busy fraction and peak device memory, as one JSON document on
# stdout (progress on stderr).  Under 5 minutes on one GPU with 16 cores at the defaults.
#
#   benchmarks/gpu_check.sh --json gpu_check.json          # on the GPU machine
#   benchmarks/gpu_check.sh --device cpu --size 200 ...    # anywhere else (null where a GPU figure is missing)
#
# Needs a Python with the package's dependencies and a CUDA build of torch (PYTHON=..., default
# .venv/bin/python, else python3); the 'gpu' extra (nvidia-ml-py) for the busy fraction.  The
# published SITS-NN weights are read from ../shared/data/sitsnn-weights/04 (--weights DIR).
# Every flag: python -m treesits_dask bench --gpu --help
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -c 'import torch, sys; ok = torch.cuda.is_available(); print(f"gpu_check: torch {torch.__version__}, CUDA {torch.version.cuda}, device: {torch.cuda.get_device_name(0) if ok else None}", file=sys.stderr)'
exec "$PYTHON" -m treesits_dask bench --gpu "$@"
