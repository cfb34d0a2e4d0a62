# The GPU figures of bench/train_step.py on a CUDA machine without internet access, whose Python already has
# torch, transformers, accelerate and peft but no diffusers (docs/benchmarks.md, 'train_step').
#
#   bash bench/gpu.sh fetch                 # on a machine where pip works: wheels of the exact diffusers / peft
#                                           # installed here, into .whl/ (ignored by git, ~7 MB)
#   bash bench/gpu.sh run [bench options]   # on the GPU machine, from the repository root, with .whl/ copied
#                                           # along: installs them under /tmp/site and runs
#                                           # python3 bench/train_step.py --device cuda [bench options]
#
# Examples for the run step:
#   bash bench/gpu.sh run                                   # SD1.5 512 px batch 4 and SDXL 1024 px batch 1, eager
#   bash bench/gpu.sh run --compile --configs sd15 --rounds 2   # CUDA graphs (compile_mode reduce-overhead)
# The log is appended to $OUT/train_step.log when OUT is set (a folder to collect results in), else /tmp.
# TORCH_LOGS=perf_hints before the run step prints why torch.compile skipped CUDA graphs, if it did.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
fetch)
    py=.venv/bin/python
    [ -x "$py" ] || py=python3
    versions=$("$py" -c 'from importlib.metadata import version; print(" ".join(n + "==" + version(n) for n in ("diffusers", "peft")))')
    echo "fetching $versions (pure-Python wheels) into .whl/"
    # shellcheck disable=SC2086
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl $versions
    ls -l .whl
    ;;
run)
    shift
    ls .whl/*.whl >/dev/null 2>&1 || { echo "no wheels in .whl/: run 'bash bench/gpu.sh fetch' where pip works, and copy .whl/ along" >&2; exit 1; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    nvidia-smi -L || true
    python3 -c 'import torch, diffusers, peft, transformers, accelerate as a; print("torch", torch.__version__, "| diffusers", diffusers.__version__, "| peft", peft.__version__, "| transformers", transformers.__version__, "| accelerate", a.__version__, "| cuda", torch.cuda.is_available())'
    log="${OUT:-/tmp}/train_step.log"
    python3 bench/train_step.py --device cuda "$@" 2>&1 | grep -v "should be kept in float32" | tee -a "$log"
    ;;
*)
    sed -n '1,14p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
