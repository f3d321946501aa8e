#!/usr/bin/env bash
# The solver table (bench/solvers.py) on a lent GPU machine, whose image has torch, triton
# and transformers but no TVM, no gguf package and no route to the package registries.
#
# What travels, in an ignored .devcarry/ (64 MiB per call, so the 98 MB GGUF goes in two):
#   .devcarry/a/part-aa                  first half of SmolLM2-135M-Instruct.Q4_1.gguf
#   .devcarry/b/part-ab, gguf.sha256     second half and the whole file's checksum
#   .devcarry/b/gguf-*.whl               the gguf package (pure Python)
#   .devcarry/b/pydoc311.txt             the default calibration corpus as CPython 3.11 has
#                                        it (the machine's 3.12 ships other pydoc topics)
#   .devcarry/b/wiki.test.raw            WikiText-2 test (evaluation)
#
#   bash bench/device/gpu_solvers.sh smoke    # call 1 (carry .devcarry/a): stash part A, CUDA tests
#   bash bench/device/gpu_solvers.sh table    # call 2 (carry .devcarry/b): the whole grid
set -eo pipefail
STASH=/tmp/abqc_dev
PY=${PY:-python3}
export PYTHONPATH="$PWD/bench/device/no_tvm:/tmp/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
       ABQC_CACHE=/tmp/abqc_cache TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/abqc_out}
mkdir -p "$STASH" "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

case "$1" in
smoke)
    cp .devcarry/a/part-aa "$STASH/"
    $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
    $PY -m pytest -q -p no:cacheprovider tests/test_calibration.py tests/test_solvers.py tests/test_capture.py \
        -k "cuda or triton or moves_with or auto_dims" 2>&1 | tail -20 || true
    $PY bench/solver_gpu.py --out "$OUT/solver_gpu.json"
    ;;
table)
    cat "$STASH/part-aa" .devcarry/b/part-ab > "$STASH/smollm2.gguf"
    echo "$(cat .devcarry/b/gguf.sha256)  $STASH/smollm2.gguf" | sha256sum -c
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .devcarry/b/gguf-*.whl
    $PY -c "from frontends.gguf import convert_gguf; convert_gguf('$STASH/smollm2.gguf', '$STASH/smollm2')"
    export ABQC_WIKITEXT="$PWD/.devcarry/b/wiki.test.raw"
    # the slices missing from the CPU table first; all share one deadline and one --out
    deadline=$((SECONDS + ${BUDGET:-460}))
    for slice in "W3A16 0" "W4A16 0,128" "W3A16 128"; do
        set -- $slice
        left=$((deadline - SECONDS)); [ "$left" -gt 30 ] || break
        timeout "$left" $PY bench/solvers.py --model "$STASH/smollm2" --resume \
            --calib .devcarry/b/pydoc311.txt --calib-device "${DEVICE:-cuda}" --eval-device "${DEVICE:-cuda}" \
            --jobs "${JOBS:-6}" --configs "$1" --group-sizes "$2" \
            --methods "${METHODS:-rtn,gptq,quantease,quantease_outlier,gptq_quantease}" \
            --max-windows "${WINDOWS:-32}" --nsamples "${NSAMPLES:-128}" \
            --out "$OUT/solvers_gpu.json" 2>&1 | tee -a "$OUT/solvers_gpu.log" \
            | tr '\r' '\n' | grep -v "it/s\]\|block/s\]\|win/s\]\|^\[abqc\] model\." | tail -25 || true
    done
    ;;
*)
    echo "usage: $0 smoke|table" >&2; exit 2 ;;
esac
