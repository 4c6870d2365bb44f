#!/usr/bin/env bash
# launch/train.sh LAUNCH CONFIG [key=value ...] [--overwrite]
#   LAUNCH: an accelerate config file, or one of this folder's names (single, ddp-cpu, ddp-gpu, zero2, zero3, fsdp)
# Runs `qaft doctor` against that launch first (exit 2 on a blocking problem), then
#   accelerate launch --config_file LAUNCH -m qaft.pipeline.cli train CONFIG ...
# except for MULTI_CPU (ddp-cpu), which goes through torchrun (see below).
# with OMP_WAIT_POLICY=PASSIVE and OMP_NUM_THREADS = cores / processes unless you set them.
# PYTHON selects the interpreter (default: .venv/bin/python of this checkout, else python).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: launch/train.sh LAUNCH CONFIG [key=value ...]  (LAUNCH: single|ddp-cpu|ddp-gpu|zero2|zero3|fsdp or a file)" >&2
  exit 2
fi
here="$(cd "$(dirname "$0")" && pwd)"
name="$1"; launch="$1"; config="$2"; shift 2
[ -f "$launch" ] || launch="$here/${launch%.yaml}.yaml"
if [ ! -f "$launch" ]; then
  echo "launch/train.sh: no accelerate config '$name'; use one of: $(cd "$here" && ls *.yaml | sed 's/\.yaml//' | tr '\n' ' ')" >&2
  exit 2
fi
py="${PYTHON:-}"
if [ -z "$py" ]; then
  if [ -x "$here/../.venv/bin/python" ]; then py="$here/../.venv/bin/python"; else py=python; fi
fi
procs="$("$py" -c 'import sys, yaml; print(int((yaml.safe_load(open(sys.argv[1])) or {}).get("num_processes", 1)))' "$launch")"
cores="$(nproc 2>/dev/null || echo 1)"
per=$(( cores / procs )); [ "$per" -ge 1 ] || per=1
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-$per}"
overrides=()
for a in "$@"; do [ "$a" = "--overwrite" ] || overrides+=("$a"); done
"$py" -m qaft.pipeline.cli doctor "$config" "${overrides[@]}" --launch "$launch"
kind="$("$py" -c 'import sys, yaml; print(str((yaml.safe_load(open(sys.argv[1])) or {}).get("distributed_type", "NO")).upper())' "$launch")"
if [ "$kind" = "MULTI_CPU" ]; then
  # accelerate 1.x starts ONE process for MULTI_CPU unless given an mpirun hostfile; torchrun starts them all,
  # and accelerate inside each picks up the gloo process group from torchrun's environment.
  export ACCELERATE_USE_CPU=true  # without it accelerate ignores the process group on CPU and each rank trains alone
  # torchrun through qaft's wrapper: a SIGTERM'd launch exits 143 as a single process does, not 1 (pipeline/launcher.py)
  exec "$py" -m qaft.pipeline.launcher --standalone --nproc_per_node "$procs" -m qaft.pipeline.cli train "$config" "$@"
fi
exec "$py" -m accelerate.commands.launch --config_file "$launch" -m qaft.pipeline.cli train "$config" "$@"
