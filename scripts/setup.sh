#!/usr/bin/env bash
# Everything a fresh machine needs: the CPU torch pin where no torch is installed, then jasper_ray with its test extra.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
python -m pip --version >/dev/null
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e '.[test]'
