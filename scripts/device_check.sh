#!/usr/bin/env bash
# The checks that need the lent GPU machine (16 cores, CUDA, no Ray installed): see ../shared/DEVICE.md.
#   1. the CUDA tests (tests/local/test_dataset.py -k cuda), skipped on machines without a GPU;
#   2. bench_ray_data.py at 1GB with all 16 cores (on 2 cores Ray's own costs cap any read; see its table).
# Needs .whl/ (ray-slim.tar.xz and Ray's missing pure-Python deps), carried; writes logs to $OUT.
set -uo pipefail
out=${OUT:-/tmp/device-out}
mkdir -p "$out"
site=$(mktemp -d)
tar xJf .whl/ray-slim.tar.xz -C "$site"
python3 -m pip install -q --no-index --no-deps --target "$site" .whl/*.whl
export PYTHONPATH=$site:. RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1
{ nproc; nvidia-smi -L; python3 -c 'import torch, ray, h5py; print(torch.__version__, ray.__version__, h5py.__version__)'; } \
    2>&1 | tee "$out/env.txt"
python3 -m pytest -q -p no:cacheprovider tests/local/test_dataset.py -k cuda -rs 2>&1 | tee "$out/cuda_tests.txt"
python3 scripts/bench_ray_data.py --size "${RAY_DATA_SIZE:-1GB}" --out /tmp > "$out/bench_ray_data.md" 2> "$out/bench_ray_data.err"
echo "bench_ray_data exit $?"
tail -20 "$out/bench_ray_data.md"
