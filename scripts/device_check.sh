#!/usr/bin/env bash
# The checks that need the lent GPU machine (an H100/H200 node, 16 cores, Python 3.12 with torch, h5py,
# numpy, pyarrow, pytest; no Ray and no network there: see shared/DEVICE.md):
#   1. the CUDA tests (tests/local/test_dataset.py -k cuda), which skip on machines without a GPU;
#   2. bench_ray_data.py at 1GB with all cores (on 2 cores Ray's own costs cap any read; see its table).
# Logs go to $OUT (default /tmp/device-out). Exit status: 0 when both pass.
#
# Ray is not installed there and cannot be downloaded there, so it travels in .whl/ (ignored by git, ~33 MB,
# under the 64 MiB the device tool carries). Two steps:
#
#   scripts/device_check.sh prepare     here, where PyPI is reachable: builds .whl/ for the device's Python
#                                       (DEVICE_PYTHON, default 3.12) and platform (DEVICE_PLATFORM, default
#                                       manylinux2014_x86_64): the Ray wheel of cluster/requirements.txt's pin,
#                                       trimmed (ray/jars, rllib, llm, serve, tune removed: 79 MB -> ~31 MB)
#                                       into .whl/ray-slim.tar.xz, and the wheels Ray needs that the device
#                                       lacks (.whl/*.whl); adds .whl/ to .git/info/exclude.
#   scripts/device_check.sh             there, with .whl carried (the device tool's run with carry [".whl"]).
#
# Where Ray of the pinned version is already importable, .whl/ is not needed. Every check that can fail
# runs before anything slow, and names what is missing and how to make it.
set -uo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."

whl=${DEVICE_CHECK_WHL:-.whl}
device_python=${DEVICE_PYTHON:-3.12}
device_platform=${DEVICE_PLATFORM:-manylinux2014_x86_64}
# Ray's dependencies the device lacks (shared/DEVICE.md), at the versions the tests run here.
ray_deps=(jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==0.30.0)
ray_pin=$(sed -n 's/^ray\(\[[^]]*\]\)\{0,1\}==\([^ ;#]*\).*/\2/p' cluster/requirements.txt)

die() {
    printf 'device_check.sh: %s\n' "$1" >&2
    shift
    [ $# = 0 ] || printf '%s\n' "$@" >&2
    exit 2
}
[ -n "$ray_pin" ] || die "no ray==VERSION pin found in cluster/requirements.txt"

missing_whl() {
    die "$1" \
        "This script needs, carried in $whl/ (not in the repository; ignored by git; ~33 MB):" \
        "  $whl/ray-slim.tar.xz  Ray $ray_pin for CPython $device_python, $device_platform, trimmed" \
        "  $whl/STAMP            what it was built for (ray=, python=, platform=)" \
        "  $whl/*.whl            ${ray_deps[*]}" \
        "Make them where PyPI is reachable, from the repository root:" \
        "  DEVICE_PYTHON=<device's python3 X.Y> scripts/device_check.sh prepare" \
        "then run this script there with .whl carried (device tool: carry [\".whl\"], command scripts/device_check.sh)."
}

prepare() {
    command -v unzip >/dev/null || die "prepare needs unzip (apt-get install unzip)"
    command -v xz >/dev/null || die "prepare needs xz (apt-get install xz-utils)"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    echo "downloading ray==$ray_pin ${ray_deps[*]} for CPython $device_python, $device_platform"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$device_python" \
        --implementation cp --platform "$device_platform" -d "$tmp/dl" "ray==$ray_pin" "${ray_deps[@]}" ||
        die "pip download failed: prepare needs PyPI (or a mirror: PIP_INDEX_URL)"
    unzip -q "$tmp"/dl/ray-"$ray_pin"-*.whl -d "$tmp/ray" || die "unzipping the Ray wheel failed"
    rm -rf "$tmp"/ray/ray/{jars,rllib,llm,serve,tune}
    mkdir -p "$whl"
    rm -f "$whl"/*.whl "$whl/ray-slim.tar.xz" "$whl/STAMP"
    (cd "$tmp/ray" && tar cf - ray ray-*.dist-info) | xz -T2 -6 >"$whl/ray-slim.tar.xz" ||
        die "packing $whl/ray-slim.tar.xz failed"
    find "$tmp/dl" -name '*.whl' ! -name 'ray-*' -exec cp {} "$whl/" \;
    printf 'ray=%s\npython=%s\nplatform=%s\n' "$ray_pin" "$device_python" "$device_platform" >"$whl/STAMP"
    if [ -d .git ] && ! grep -qxF '/.whl/' .git/info/exclude 2>/dev/null; then
        mkdir -p .git/info && echo '/.whl/' >>.git/info/exclude
    fi
    du -sh "$whl"
    echo "next: on the GPU machine, with .whl carried: scripts/device_check.sh"
}

stamp() { sed -n "s/^$1=//p" "$whl/STAMP"; }

check() {
    local out=${OUT:-/tmp/device-out} site="" python_here status=0
    mkdir -p "$out"
    python_here=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])') || die "no python3 here"
    python3 -c 'import torch, h5py, numpy, pyarrow, pytest, tqdm' 2>/dev/null ||
        die "python3 $python_here lacks one of torch, h5py, numpy, pyarrow, pytest, tqdm (the device has them: shared/DEVICE.md)"

    # 1. Ray: installed, or the carried trimmed copy built for this Python and machine.
    if ! python3 -c "import ray, sys; sys.exit(ray.__version__ != '$ray_pin')" 2>/dev/null; then
        [ -f "$whl/ray-slim.tar.xz" ] && [ -f "$whl/STAMP" ] ||
            missing_whl "Ray $ray_pin is not importable here and $whl/ray-slim.tar.xz (or $whl/STAMP) is missing."
        [ "$(stamp ray)" = "$ray_pin" ] ||
            missing_whl "$whl/ holds Ray $(stamp ray), cluster/requirements.txt pins $ray_pin: rebuild it."
        [ "$(stamp python)" = "$python_here" ] ||
            missing_whl "$whl/ was built for Python $(stamp python), this machine runs $python_here: rebuild it with DEVICE_PYTHON=$python_here."
        [[ "$(stamp platform)" == *"_$(uname -m)" ]] ||
            missing_whl "$whl/ was built for $(stamp platform), this machine is $(uname -m): rebuild it with DEVICE_PLATFORM."
        compgen -G "$whl/*.whl" >/dev/null || missing_whl "$whl/*.whl (Ray's missing dependencies) are missing."
    fi

    # 2. A GPU: without one the CUDA tests only skip.
    if ! nvidia-smi -L >/dev/null 2>&1 && [ "${DEVICE_CHECK_ALLOW_NO_GPU:-0}" != 1 ]; then
        die "no NVIDIA GPU here (nvidia-smi -L failed): the CUDA tests would only skip." \
            "Run this on the lent GPU machine, or set DEVICE_CHECK_ALLOW_NO_GPU=1 to run it anyway."
    fi

    if [ -f "$whl/STAMP" ] && ! python3 -c "import ray, sys; sys.exit(ray.__version__ != '$ray_pin')" 2>/dev/null; then
        site=$(mktemp -d)
        tar xJf "$whl/ray-slim.tar.xz" -C "$site" || die "unpacking $whl/ray-slim.tar.xz failed"
        python3 -m pip install -q --no-index --no-deps --target "$site" "$whl"/*.whl ||
            die "installing $whl/*.whl failed"
    fi
    export PYTHONPATH=${site:+$site:}.${PYTHONPATH:+:$PYTHONPATH} RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1

    {
        nproc
        nvidia-smi -L
        python3 -c 'import torch, ray, h5py; print(torch.__version__, ray.__version__, h5py.__version__)'
    } 2>&1 | tee "$out/env.txt"
    python3 -m pytest -q -p no:cacheprovider tests/local/test_dataset.py -k cuda -rs 2>&1 | tee "$out/cuda_tests.txt"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    python3 scripts/bench_ray_data.py --size "${RAY_DATA_SIZE:-1GB}" --out /tmp >"$out/bench_ray_data.md" 2>"$out/bench_ray_data.err"
    local bench=$?
    echo "bench_ray_data exit $bench"
    [ "$bench" = 0 ] || status=1
    tail -20 "$out/bench_ray_data.md"
    return "$status"
}

case "${1:-}" in
    prepare) prepare ;;
    "") check ;;
    *) die "usage: scripts/device_check.sh [prepare]" ;;
esac
