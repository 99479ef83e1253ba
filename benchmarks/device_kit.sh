#!/usr/bin/env bash
# The GPU benchmarks of the "Benchmarks" issue, prepared here and run in one
# call on the device machine (nothing can be installed there from the network).
#
#   here:   benchmarks/device_kit.sh build
#           -> .gpu/site.tar.xz (git-ignored; 18 MB): spacy-m3el and what
#              the GPU image lacks (benchmarks/device_requirements.txt), built
#              for CPython 3.12 x86-64, debug symbols stripped to fit the
#              64 MiB that travels with the working tree.
#   there:  bash benchmarks/device_kit.sh run       (device tool: carry [".gpu"])
#           -> under $OUT: training_throughput_cuda.json, speed_cuda.json, their
#              logs and nvidia_smi.txt.
#
# Environment: KIT_PYTHON_VERSION (build, default 3.12); PYTHON (run, default
# python3), DEVICE (cuda), BATCH (128), STEPS (10), SIZES (110000).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
KIT="$ROOT/.gpu"

build() {
    local version="${KIT_PYTHON_VERSION:-3.12}"
    local target=(--only-binary=:all: --python-version "$version" --implementation cp
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
        --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64
        --platform manylinux1_x86_64 --platform any)
    rm -rf "$KIT"
    mkdir -p "$KIT/wheels" "$KIT/site"
    python -m pip download -q --no-deps "${target[@]}" -d "$KIT/wheels" \
        -r "$ROOT/benchmarks/device_requirements.txt"
    python -m pip wheel -q --no-deps --no-build-isolation -w "$KIT/wheels" "$ROOT"
    python -m pip install -q --no-deps --no-compile "${target[@]}" --target "$KIT/site" "$KIT/wheels"/*.whl
    find "$KIT/site" -name "*.so" -exec strip --strip-unneeded {} +
    rm -rf "$KIT/site/spacy/tests" "$KIT/site/thinc/tests" "$KIT/site/bin"
    tar -cJf "$KIT/site.tar.xz" -C "$KIT/site" .
    rm -rf "$KIT/site" "$KIT/wheels"
    du -h "$KIT/site.tar.xz"
}

run() {
    local out="${OUT:-$ROOT/benchmarks/results}" python="${PYTHON:-python3}" device="${DEVICE:-cuda}"
    local site=/tmp/m3el_site status=0
    [ -f "$KIT/site.tar.xz" ] || { echo "No $KIT/site.tar.xz: run '$0 build' first and carry .gpu" >&2; exit 2; }
    mkdir -p "$site" "$out"
    tar -xJf "$KIT/site.tar.xz" -C "$site"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
    nvidia-smi > "$out/nvidia_smi.txt" 2>&1 || true
    "$python" "$ROOT/benchmarks/training_throughput.py" --device "$device" --batch-size "${BATCH:-128}" \
        --steps "${STEPS:-10}" --out "$out/training_throughput_$device.json" 2>&1 \
        | tee "$out/training_throughput.log" || status=1
    "$python" "$ROOT/benchmarks/speed.py" --device "$device" --sizes ${SIZES:-110000} \
        --paper-max "$(echo ${SIZES:-110000} | tr ' ' '\n' | sort -n | tail -1)" \
        --out "$out/speed_$device.json" 2>&1 | tee "$out/speed.log" || status=1
    exit $status
}

case "${1:-}" in
    build) build ;;
    run) run ;;
    *) echo "usage: $0 build|run" >&2; exit 2 ;;
esac
