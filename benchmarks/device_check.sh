#!/usr/bin/env bash
# The GPU checks, prepared as one run for a borrowed GPU machine that cannot reach the network.
#
#   benchmarks/device_check.sh wheels   # here, with PyPI: the Python 3.12 wheels that such a
#                                       # machine's image lacks, into $WHEEL_DIR (default .whl/,
#                                       # git-ignored; about 5 MB)
#   benchmarks/device_check.sh run      # there: every check below, logs into $OUT (default
#                                       # runs/device_check), each step under its own time limit
#
# `run` expects an image that already holds a CUDA build of jax (with its CUDA plugin), torch
# and transformers (as the project's device machines do: jax 0.11.2, which needs Python 3.12, so
# not requirements.txt's 0.10.2) and adds the wheels from $WHEEL_DIR on PYTHONPATH: the pure-Python
# flax, optax and orbax-checkpoint of requirements.txt (the image's own may be other versions;
# these pins were checked against jax 0.11.2 on a CPU), ml-collections, pycocotools, grain and
# what grain needs. $WHEEL_DIR is git-ignored, so a device call must carry it (carry: [".whl"]); `run`
# stops at once, naming them, when those packages are neither installed nor in $WHEEL_DIR.
# Its steps, in order of what the project lacks most:
#   1. environment: GPU, jax / torch versions and devices, the sampler impl `auto` picks;
#   2. pallas_tests: the Pallas kernel compiled by Triton (not interpreted) against PyTorch's
#      grid_sample formulation and impl='xla', forward and gradients
#      (tests/test_ms_deform_attn_pallas.py with JAX on the GPU);
#   3. msda: benchmarks/msda.py at 800x1333, batches 2 and 8, fp32 and bf16, impls xla and pallas
#      (the README's GPU sampler targets: pallas against xla, and against the bandwidth floor;
#      xla_packed, the TPU layout, is left out to fit the time limit);
#   4. train_step: benchmarks/train_step.py, the jitted train step on the GPU against HF's step
#      on the same GPU (the issue's JAX/HF <= 0.5 target); with the XLA sampler if the run with
#      the Pallas one fails.
# A failing step is logged and the next one still runs; the exit status is the number of
# failed steps. STEPS=msda,train_step (say) runs only those steps, e.g. to rerun one; an unknown
# name is an error. The time limits add up to 555 s, 595 s with the 10 s each may take to kill
# a step that overran: inside one device call (600 s). On an H200 (2026-12-04) the kernel tests
# took 61 s, the tiny train-step benchmark finished inside 240 s and the full one alone took
# about 180 s, and msda with three impls did 22 of its 48 rows in 120 s (the decoder rows, not
# reached then, are smaller).
set -u
cd "$(dirname "$0")/.."
STEPS=${STEPS:-}
WHEEL_DIR=${WHEEL_DIR:-.whl}
ALL_STEPS=(environment pallas_tests msda train_step)

PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# The runtime pins of requirements.txt that a CUDA image lacks or may hold in other versions,
# plus grain's own needs.
WHEELS=(flax==0.12.8 optax==0.2.8 orbax-checkpoint==0.12.8
        ml-collections==1.1.0 pycocotools==2.0.11 grain==0.2.18 array-record==0.8.6
        portpicker==1.6.0)

wheels() {
  mkdir -p "$WHEEL_DIR"
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${PLATFORMS[@]}" -d "$WHEEL_DIR" "${WHEELS[@]}"
  ls -l "$WHEEL_DIR"
}

# step NAME SECONDS CMD...: runs CMD under `timeout`, output to the screen and $OUT/NAME.log.
FAILED=0
step() {
  local name=$1 seconds=$2
  shift 2
  if [ -n "$STEPS" ] && [[ ",$STEPS," != *",$name,"* ]]; then return; fi
  echo "=== $name (at most ${seconds}s): $*"
  local start=$SECONDS
  timeout --kill-after=10 "$seconds" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - start))s"
  [ "$rc" -eq 0 ] || FAILED=$((FAILED + 1))
}

run() {
  OUT=${OUT:-runs/device_check}
  local name
  for name in ${STEPS//,/ }; do
    if [[ " ${ALL_STEPS[*]} " != *" $name "* ]]; then
      echo "device_check: unknown step '$name' in STEPS (the steps: ${ALL_STEPS[*]})" >&2
      exit 2
    fi
  done
  mkdir -p "$OUT"
  export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
  if compgen -G "$WHEEL_DIR/*.whl" > /dev/null; then
    python3 -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/device_check_site "$WHEEL_DIR"/*.whl || exit 1
    export PYTHONPATH=/tmp/device_check_site${PYTHONPATH:+:$PYTHONPATH}
  fi
  if ! python3 -c "import ml_collections, pycocotools, grain" 2> /dev/null; then
    echo "device_check: ml_collections, pycocotools or grain cannot be imported and no wheel in" \
         "$WHEEL_DIR provides it: run '$0 wheels' where PyPI is reachable, and carry" \
         "$WHEEL_DIR to this machine" >&2
    exit 2
  fi
  step environment 35 python3 -c '
import flax, jax, optax, orbax.checkpoint, torch, transformers
print("jax", jax.__version__, jax.devices())
print("flax", flax.__version__, "optax", optax.__version__, "orbax-checkpoint",
      orbax.checkpoint.__version__)
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
print("transformers", transformers.__version__)
from ddetr_jax.ops import ms_deform_attn, ms_deform_attn_pallas
print("auto impl:", ms_deform_attn.resolve_auto_impl(),
      "| pallas unavailable because:", ms_deform_attn_pallas.gpu_kernel_unavailable_reason())'
  # tests/conftest.py keeps an unset JAX_PLATFORMS / CUDA_VISIBLE_DEVICES on the CPU; set, they
  # stay, so the kernel tests run on the GPU without interpret mode (all but the test of what
  # `auto` picks on a CPU).
  step pallas_tests 90 env JAX_PLATFORMS=cuda CUDA_VISIBLE_DEVICES=0 \
    python3 -m pytest -q -p no:cacheprovider tests/test_ms_deform_attn_pallas.py \
    -k "not auto_resolution"
  step msda 150 python3 benchmarks/msda.py --image 800x1333 --batches 2,8 --dtypes fp32,bf16 \
    --impls xla,pallas --repeats 5 --no_torch
  # JAX and torch share the GPU in one process: JAX takes half of its memory, not 75%. Should
  # the run with the Pallas sampler fail, the same run with the XLA sampler still measures the
  # step, inside the same limit.
  step train_step 280 env XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 bash -c \
    'python3 benchmarks/train_step.py --steps 10 ||
     python3 benchmarks/train_step.py --steps 10 --attention_impl xla'
  echo "device_check: $FAILED step(s) failed; logs in $OUT"
  exit "$FAILED"
}

case "${1:-}" in
  wheels) wheels ;;
  run) run ;;
  *) echo "usage: $0 wheels|run" >&2; exit 2 ;;
esac
