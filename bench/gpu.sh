#!/usr/bin/env bash
# The GPU run, in one script: install, show the device, the parity tests on the GPU, then the benches (train in bf16
# and fp32, generate at batch 1/16/64, serve), one `RESULT {json}` line per bench. Under 8 minutes on a fresh
# single-GPU machine (each step has a time limit inside a total budget, GPU_SH_BUDGET, default 450 s).
#
#   bash bench/gpu.sh --prepare   # on a machine with PyPI and ../shared: what a machine without them needs, into
#                                 # shared/ (ignored by git; a shared/ inside the checkout travels with it):
#                                 # shared/fixtures (PyTorch MiniMind's outputs, for the parity tests) and
#                                 # shared/wheels (the server's packages, for Python 3.12 x86-64)
#   bash bench/gpu.sh             # the run; without a GPU (or with GPU_SH_DRY=1) a dry run: every step on the CPU
#                                 # with tiny settings, so the script itself is checked anywhere in a few minutes
#
# Install: packages from shared/wheels (or $GPU_SH_WHEELS) when there (pip resolves offline against what is
# installed, adding only what is missing), this checkout with --no-deps; if the Python still lacks JAX or the
# server's packages, `pip install -e '.[cuda12,test]'` (needs PyPI). A Python that already has them (an image with
# JAX for its CUDA, a dev venv) is used as it is: $PYTHON, else .venv/bin/python, else python3.
# Parity: tests/test_attention.py, tests/test_model.py and tests/test_generate.py with
# JAX_DEFAULT_MATMUL_PRECISION=highest (a GPU computes fp32 matmuls in TF32 by default, ~1e-3 relative; the tests'
# fp32 tolerance is 1e-5, logits against PyTorch MiniMind's fp32), and the cuDNN attention tests, which run only on
# a GPU (bf16, within 2% of the xla implementation). The fixtures come from $MINIMIND_FIXTURES, else shared/fixtures,
# else ../shared/fixtures; without them the PyTorch parity tests skip (said in the log).
# Logs: $GPU_SH_LOGS (default a new temporary directory), one file per step.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
WHEELS=${GPU_SH_WHEELS:-shared/wheels}
SERVER_PKGS="fastapi uvicorn prometheus-client"  # the serve extra (bench/serve.py runs the real server)

prepare() {
  mkdir -p shared/fixtures "$WHEELS"
  local src=${MINIMIND_FIXTURES:-../shared/fixtures}
  for case in v2_tiny v3_tiny; do
    [ -d "$src/$case" ] || { echo "no $src/$case: set MINIMIND_FIXTURES"; return 1; }
    rm -rf "shared/fixtures/$case" && cp -r "$src/$case" shared/fixtures/
  done
  # the versions this checkout's Python runs, for the device's Python (3.12, x86-64 manylinux), with their deps
  local pins
  pins=$("$PYTHON" -c 'import importlib.metadata as m, sys
print(" ".join(f"{n}=={m.version(n)}" for n in sys.argv[1:]))' $SERVER_PKGS) || return 1
  "$PYTHON" -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHEELS" $pins || return 1
  du -sh shared/fixtures "$WHEELS"
  ls "$WHEELS"
}

if [ "${1:-}" = "--prepare" ]; then
  prepare
  exit $?
fi

LOGS=${GPU_SH_LOGS:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_sh.XXXXXX")}
mkdir -p "$LOGS"
BUDGET=${GPU_SH_BUDGET:-450}
FAILED=()
SUMMARY=()

has() {  # has MODULE...: the Python imports them all
  "$PYTHON" -c "import importlib, sys; [importlib.import_module(m) for m in sys.argv[1:]]" "$@" 2>/dev/null
}

SITE=${TMPDIR:-/tmp}/minimind_site  # where the wheels go if the Python's own site-packages cannot take them
install_deps() {
  if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --find-links "$WHEELS" $SERVER_PKGS \
      || "$PYTHON" -m pip install -q --no-index --find-links "$WHEELS" --target "$SITE" $SERVER_PKGS || return 1
    if [ -d "$SITE" ]; then export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"; fi
  fi
  "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
    || echo "install: editable install of this checkout failed; PYTHONPATH=$ROOT instead"
  if ! has jax flax optax orbax.checkpoint chex safetensors tokenizers jinja2 tqdm pytest httpx fastapi uvicorn \
       prometheus_client; then
    "$PYTHON" -m pip install -q --retries 1 --timeout 15 -e '.[cuda12,test]' || return 1
  fi
  "$PYTHON" -c 'import jax, flax; print("jax", jax.__version__, "flax", flax.__version__)'
}

step() {  # step NAME LIMIT_S CMD...: run CMD (log in $LOGS/NAME.log) within LIMIT_S and what is left of the budget
  local name=$1 limit=$2 left rc t0
  shift 2
  left=$((BUDGET - SECONDS))
  if [ "$limit" -gt "$left" ]; then limit=$left; fi
  if [ "$limit" -lt 15 ]; then
    echo "== $name: skipped, the ${BUDGET}s budget is spent"
    FAILED+=("$name"); SUMMARY+=("$name: skipped (budget)"); return
  fi
  echo "== $name (at most ${limit}s): $*"
  t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  grep -v '^RESULT ' "$LOGS/$name.log" | tail -n "${TAIL:-4}" | cut -c1-400  # a bench's RESULT: see result()
  [ "$rc" = 124 ] && echo "   (stopped at its ${limit}s limit)"
  [ "$rc" = 0 ] || FAILED+=("$name")
  SUMMARY+=("$name: rc $rc, $((SECONDS - t0)) s")
}

result() {  # result NAME: the bench's one RESULT line: {"bench", "dry_run", "result": its RESULT json (a list of
  # them when it prints several, as bench/serve.py does: one per client count and a summary)}
  "$PYTHON" - "$1" "$LOGS/$1.log" "$DRY" <<'EOF'
import json, re, sys
name, log, dry = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
found = [json.loads(x) for x in re.findall(r"^RESULT (\{.*\})$", open(log, errors="replace").read(), re.M)]
print("RESULT " + json.dumps({"bench": name, "dry_run": dry,
                              "result": None if not found else found[0] if len(found) == 1 else found}))
EOF
}

# ------------------------------------------------------------------------------------------------ install, device
echo "== install ($PYTHON)"
t0=$SECONDS
install_deps >"$LOGS/install.log" 2>&1
rc=$?
tail -n 4 "$LOGS/install.log" | cut -c1-400
[ "$rc" = 0 ] || FAILED+=(install)
SUMMARY+=("install: rc $rc, $((SECONDS - t0)) s")
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
BACKEND=$("$PYTHON" -c 'import jax; print(jax.default_backend())' 2>/dev/null || echo none)
DRY=${GPU_SH_DRY:-}
if [ -z "$DRY" ]; then
  if [ "$BACKEND" = gpu ]; then DRY=0; else DRY=1; echo "no GPU (JAX backend: $BACKEND): a dry run, tiny settings"; fi
fi
if [ "$DRY" = 1 ]; then export JAX_PLATFORMS=cpu; fi
TAIL=6 step device 60 "$PYTHON" -c 'import jax; print(jax.devices()); print("backend", jax.default_backend(), "jax",
jax.__version__, "device kind", jax.devices()[0].device_kind)'
command -v nvidia-smi >/dev/null && [ "$DRY" = 0 ] && nvidia-smi --query-gpu=name,memory.total,driver_version \
  --format=csv,noheader

# ------------------------------------------------------------------------------------------------ parity tests
if [ -z "${MINIMIND_FIXTURES:-}" ]; then
  for d in shared/fixtures ../shared/fixtures; do
    if [ -d "$d/v2_tiny" ]; then export MINIMIND_FIXTURES=$ROOT/$d; break; fi
  done
fi
[ -d "${MINIMIND_FIXTURES:-/nonexistent}/v2_tiny" ] \
  || echo "WARNING: no fixtures (bash bench/gpu.sh --prepare, or MINIMIND_FIXTURES): the PyTorch parity tests skip"
if [ "$DRY" = 1 ]; then  # a few of each file: the script, not the suite, is what a dry run checks
  TESTS=(tests/test_attention.py tests/test_model.py::test_logits_loss_hidden_match_pytorch
         tests/test_generate.py::test_greedy_matches_pytorch_minimind)
else
  TESTS=(tests/test_attention.py tests/test_model.py tests/test_generate.py)
fi
JAX_DEFAULT_MATMUL_PRECISION=highest TAIL=8 step parity_tests 300 "$PYTHON" -m pytest -q -rs -p no:cacheprovider \
  "${TESTS[@]}"

# ------------------------------------------------------------------------------------------------ benches
if [ "$DRY" = 1 ]; then
  TRAIN=(--hidden_size 64 --num_hidden_layers 2 --batch 4 --seq 64 --steps 2)
  GEN=(--hidden_size 64 --num_hidden_layers 2 --prompt_len 8 --new_tokens 8 --repeats 1 --adapters 2)
  SERVE=(--hidden_size 64 --num_hidden_layers 2 --clients 1,4 --requests_per_client 1 --max_tokens 16 --reference 0)
else  # 512x8 (MiniMind2-small), as train.lora runs it on a GPU: 24 rows of 340 tokens a chunk, 2 chunks a step
  TRAIN=(--batch 48 --seq 340 --steps 5)
  GEN=(--repeats 3)
  SERVE=(--clients 1,16 --requests_per_client 2 --max_tokens 64 --reference 1 --reference_repeats 1)
fi
train() {  # train NAME DTYPE REMAT [ATTENTION]: bench/train.py mode 1 (tokens/s, model FLOPs, MFU, memory)
  MINIMIND_ATTENTION=${4:-auto} step "train_$1" 120 "$PYTHON" bench/train.py --modes 1 --dtype "$2" --remat "$3" \
    "${TRAIN[@]}"
  result "train_$1"
}
train bf16 bfloat16 0        # on a GPU: cuDNN's flash attention (auto)
train fp32 float32 0         # jax.nn.dot_product_attention's xla implementation (auto), TF32 matmuls
step generate 120 "$PYTHON" bench/generate.py --batches 1,16,64 "${GEN[@]}"
result generate
# the bench's process and the server's share the GPU: no preallocation of 75% of it by each
XLA_PYTHON_CLIENT_PREALLOCATE=false step serve 180 "$PYTHON" bench/serve.py "${SERVE[@]}"
result serve
# last, as the budget allows: what remat costs and saves, and cuDNN against the xla implementation in bf16
train bf16_remat bfloat16 1
train bf16_xla bfloat16 0 xla

echo "== summary ($([ "$DRY" = 1 ] && echo "dry run on the CPU" || echo "GPU run"), ${SECONDS}s, logs in $LOGS)"
printf '   %s\n' "${SUMMARY[@]}"
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "FAILED: ${FAILED[*]}"
  exit 1
fi
echo "all steps passed"
