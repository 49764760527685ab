#!/usr/bin/env bash
# The first-GPU check, one script: install the project with a CUDA build of torch, then run the gpu-marked tests,
# `dynmm profile` on the GPU, the latency-against-FLOPs bench on CUDA (MOSEI sizes and segmentation, synchronised),
# the CPU routed-inference bench, a small GPU training run and a tiny study, all within an 8-minute budget. Every
# step has its own time limit and the budget caps it; a failed step is recorded and the next one runs. The figures
# (each step's status, time and output tail, the profile tables, the benches' JSON lines) go into one JSON file.
#
#   bash bench/gpu_check.sh [--out DIR] [--python PYTHON] [--wheels DIR] [--no-install] [--budget SECONDS]
#   bash bench/gpu_check.sh --cpu-dry-run       # every step on the CPU at small sizes, with the current .venv
#
# --out DIR: where gpu_check.json and gpu_check.log go (default: $OUT when set, else .dynmm/gpu-check).
# --python: the interpreter to build the virtual environment from (default python3); the environment (.dynmm/gpu-venv)
#   sees the system's packages, so a CUDA torch already installed in the range of pyproject.toml is kept.
# --wheels DIR: install from local wheels only (a machine without network); --no-install: use --python as it is.
set -u -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
BUDGET_S=480
OUT_DIR=${OUT:-.dynmm/gpu-check}
BASE_PYTHON=python3
VENV=.dynmm/gpu-venv
WHEELS=""
INSTALL=1
DRY_RUN=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT_DIR=$2; shift 2 ;;
    --python) BASE_PYTHON=$2; shift 2 ;;
    --wheels) WHEELS=$2; shift 2 ;;
    --no-install) INSTALL=0; shift ;;
    --budget) BUDGET_S=$2; shift 2 ;;
    --cpu-dry-run) DRY_RUN=1; INSTALL=0; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [ "$DRY_RUN" = 1 ]; then
  PY=${GPU_CHECK_PYTHON:-.venv/bin/python}
  DEVICE=cpu
else
  PY=$VENV/bin/python
  [ "$INSTALL" = 1 ] || PY=$BASE_PYTHON
  DEVICE=cuda
fi
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/dynmm-gpu-check.XXXXXX")
STEPS=$WORK/steps.tsv
LOG=$OUT_DIR/gpu_check.log
: >"$STEPS"
: >"$LOG"
export DYNMM_HOME=$WORK/home PYTHONUNBUFFERED=1 RAY_DATA_DISABLE_PROGRESS_BARS=1
START=$SECONDS

# run_step NAME LIMIT_S COMMAND...: run under min(LIMIT_S, budget left); record name, status, rc, seconds, limit.
run_step() {
  local name=$1 limit=$2 left rc status started
  shift 2
  left=$((BUDGET_S - (SECONDS - START)))
  if [ "$left" -lt 15 ]; then
    printf '%s\tskipped\t-1\t0\t0\n' "$name" >>"$STEPS"
    echo "== $name: skipped (budget spent)" | tee -a "$LOG"
    return
  fi
  [ "$limit" -le "$left" ] || limit=$left
  echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
  started=$SECONDS
  # through bash, so that a step can be one of the functions below (exported); timeout ends its process group
  timeout --kill-after=10 "$limit" bash -c '"$@"' "$name" "$@" >"$WORK/$name.log" 2>&1
  rc=$?
  case $rc in 0) status=ok ;; 124|137) status=timeout ;; *) status=failed ;; esac
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$((SECONDS - started))" "$limit" >>"$STEPS"
  cat "$WORK/$name.log" >>"$LOG"
  echo "-- $name: $status (rc $rc, $((SECONDS - started))s)" | tee -a "$LOG"
}

# Python helpers as files, so that the functions below survive `export -f` into a step's bash intact.
cat >"$WORK/torch_requirement.py" <<'EOF'
import tomllib
dependencies = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print(next(d for d in dependencies if d.replace(" ", "").startswith("torch")).replace(" ", ""))
EOF
cat >"$WORK/torch_state.py" <<'EOF'
# exit 0: a CUDA torch in the range is installed; 1: none in the range; 2: one in the range without CUDA
import sys
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
try:
    import torch
except ImportError:
    sys.exit(1)
if not Requirement(sys.argv[1]).specifier.contains(torch.__version__.split("+")[0]):
    sys.exit(1)
sys.exit(0 if torch.cuda.is_available() else 2)
EOF
cat >"$WORK/environment.py" <<'EOF'
import json, os, platform
import torch
print(json.dumps({
    "python": platform.python_version(), "torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
    "cuda": torch.version.cuda, "gpus": torch.cuda.device_count(), "cpus": os.cpu_count(),
    "gpu_names": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
}))
EOF

install_project() {
  local pip_source=() torch_requirement state
  [ -z "$WHEELS" ] || pip_source=(--no-index --find-links "$WHEELS")
  "$BASE_PYTHON" -m venv --system-site-packages "$VENV" || return 1
  torch_requirement=$("$PY" "$WORK/torch_requirement.py") || return 1
  "$PY" "$WORK/torch_state.py" "$torch_requirement"
  state=$?
  # the default index's Linux wheels of torch are CUDA builds; a CPU build already there is replaced
  case $state in
    0) echo "keeping the installed CUDA torch, in the range $torch_requirement" ;;
    2) "$PY" -m pip install --quiet --force-reinstall "${pip_source[@]}" "$torch_requirement" || return 1 ;;
    *) "$PY" -m pip install --quiet --upgrade "${pip_source[@]}" "$torch_requirement" || return 1 ;;
  esac
  "$PY" -m pip install --quiet "${pip_source[@]}" -e ".[dev]"
}

environment() {
  "$PY" "$WORK/environment.py"
}

# the installed command, else the same entry point through the interpreter
dynmm_cli() {
  if [ -x "$(dirname "$PY")/dynmm" ]; then
    "$(dirname "$PY")/dynmm" "$@"
  else
    "$PY" -c 'import sys; from dynmm.cli import main; sys.exit(main())' "$@"
  fi
}

export PY BASE_PYTHON VENV WHEELS WORK
export -f install_project environment dynmm_cli
if [ "$INSTALL" = 1 ]; then
  run_step install 200 install_project
fi
run_step environment 60 environment
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
TRAIN_WORKERS=2  # NCCL runs one rank per GPU: as many GPU workers as GPUs, two at most
[ "$DRY_RUN" = 1 ] || { [ "$GPUS" -ge 2 ] || TRAIN_WORKERS=1; }

if [ "$DRY_RUN" = 1 ]; then
  profile_sizes=(--batch-size 1 --batch-size 8 --repeats 3)
  seg_profile=(--set model.args.preset=tiny --set "model.args.input_size=[64,64]")
  latency_args=(--quick --repeats 1 --warmup 0 --batch-size 8 --seg-size 64 64)
  dynamic_args=(--batch-size 32 --repeats 1 --seg-size 64 96 --seg-batch-size 5)
  gpu_settings=(--set scaling.use_gpu=false --set scaling.num_workers=2)
  trial_settings=(--set scaling.use_gpu=false --set scaling.num_workers=1)
else
  profile_sizes=()
  seg_profile=()
  latency_args=()
  dynamic_args=(--repeats 3)
  gpu_settings=(--set scaling.use_gpu=true --set "scaling.num_workers=$TRAIN_WORKERS" --set scaling.gpus_per_worker=1
                --set scaling.cpus_per_worker=1)
  trial_settings=(--set scaling.use_gpu=true --set scaling.num_workers=1 --set scaling.gpus_per_worker=0.5
                  --set scaling.cpus_per_worker=1)
fi
short_stages=(--set stages.experts.epochs=3 --set stages.gate.epochs=3 --set stages.gate.epoch_hard=1)

run_step gpu_tests 150 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests
run_step profile_mosei 60 dynmm_cli profile pipelines/mosei.yaml --device "$DEVICE" "${profile_sizes[@]}" \
  --output "$WORK/profile-mosei.json"
run_step latency_vs_flops 150 "$PY" bench/latency_vs_flops.py --device "$DEVICE" "${latency_args[@]}"
run_step train 120 dynmm_cli train pipelines/digits.yaml "${gpu_settings[@]}" "${short_stages[@]}"
run_step study 150 dynmm_cli tune pipelines/digits.yaml "${trial_settings[@]}" "${short_stages[@]}" \
  --set search.num_trials=2 --set search.startup_trials=2 --set search.scheduler.kind=fifo
run_step profile_segmentation 60 dynmm_cli profile pipelines/nyuv2.yaml --device "$DEVICE" "${seg_profile[@]}" \
  "${profile_sizes[@]}" --output "$WORK/profile-nyuv2.json"
run_step dynamic_inference 90 "$PY" bench/dynamic_inference.py "${dynamic_args[@]}"

# Assemble the one JSON file: steps, environment, the profile tables and the benches' JSON lines.
REPORT_PYTHON=$(command -v "$PY" || command -v python3)
"$REPORT_PYTHON" - "$WORK" "$OUT_DIR/gpu_check.json" "$BUDGET_S" "$((SECONDS - START))" \
  "$DEVICE" "$DRY_RUN" "$TRAIN_WORKERS" <<'EOF'
import json, os, sys
from pathlib import Path

work, target, budget, elapsed, device, dry_run, train_workers = sys.argv[1:8]
work = Path(work)


def tail(name, lines=15):
    path = work / f"{name}.log"
    return path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else []


def last_json(name):
    for line in reversed(tail(name, 40)):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


steps = []
for line in (work / "steps.tsv").read_text().splitlines():
    name, status, rc, seconds, limit = line.split("\t")
    steps.append({"name": name, "status": status, "rc": int(rc), "seconds": int(seconds), "limit_s": int(limit),
                  "tail": tail(name)})
figures = {name: last_json(name) for name in ("environment", "latency_vs_flops", "dynamic_inference")}
for name in ("mosei", "nyuv2"):
    path = work / f"profile-{name}.json"
    figures[f"profile_{name}"] = json.loads(path.read_text())["rows"] if path.exists() else None
figures["gpu_tests"] = next((line for line in reversed(tail("gpu_tests")) if " in " in line), None)
report = {
    "device": device, "cpu_dry_run": dry_run == "1", "budget_s": int(budget), "elapsed_s": int(elapsed),
    "train_workers": int(train_workers), "all_ok": all(step["status"] == "ok" for step in steps),
    "steps": steps, "figures": figures,
}
temporary = f"{target}.tmp"
with open(temporary, "w") as file:
    json.dump(report, file, indent=1)
os.replace(temporary, target)
print(f"wrote {target}: " + ", ".join(f"{step['name']} {step['status']}" for step in steps))
EOF
