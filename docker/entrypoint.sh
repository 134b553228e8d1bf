#!/usr/bin/env bash
# Entrypoint of the gpt-train image (docs/docker.md).
#
#   docker run IMAGE                          train the default preset (the bundled corpus, offline)
#   docker run IMAGE CONFIG [key=value ...]   train CONFIG (a preset name or a .yaml path) with overrides
#   docker run IMAGE train CONFIG [...]       the same, spelled out
#   docker run IMAGE prepare|generate|export|... ARGS    any other gpt-train command, one process
#   docker run IMAGE bash | python3 ... | nvidia-smi      any program on PATH
#
# Training uses every GPU the container sees: `torchrun --nproc-per-node=<GPUs>`, one process per GPU. Without a
# GPU it is one plain process, no torchrun. GPUs counted as the ranks will use them (torch's CUDA); GPUs that are
# there (device nodes, nvidia-smi) but that CUDA cannot use (a driver older than the image's CUDA) stop it with
# the reason; with train.device=cpu among the arguments it trains in one process on the CPU. Environment:
#   NPROC_PER_NODE   processes per node instead of the GPU count (on CPU too: N gloo processes under torchrun)
#   TORCHRUN_ARGS    extra torchrun arguments, split on spaces, e.g. for two nodes:
#                    "--nnodes=2 --node-rank=0 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 --rdzv-id=JOB"
#                    (without it a single-node run uses --standalone: a free local port, no clashes)
#   OMP_NUM_THREADS  threads per process; default under torchrun: the CPUs this container may use / processes
#   GPT_TRAIN_DRY_RUN=1  print the command instead of running it
set -euo pipefail

PYTHON=${PYTHON:-python3}
say() { echo "gpt-train-entrypoint: $*" >&2; }

launch() {
  if [ "${GPT_TRAIN_DRY_RUN:-0}" = 1 ]; then
    printf '%q ' "$@" | sed 's/ $//'
    echo
    exit 0
  fi
  exec "$@"
}

# GPUs the ranks will use: torch's CUDA count, which honours --gpus, NVIDIA_VISIBLE_DEVICES and
# CUDA_VISIBLE_DEVICES (and SLURM's binding), asked the way the ranks ask (gpt_train.distributed), so that the two
# agree: GPUs that NVML (nvidia-smi) or the device nodes show but that CUDA cannot start on fail here, loudly, and
# never become zero GPUs and a run on the CPU. No NVIDIA device node, no nvidia-smi and no CUDA_VISIBLE_DEVICES
# mean no GPU, without paying for importing torch.
gpu_count() {
  if ! compgen -G '/dev/nvidia[0-9]*' >/dev/null && ! command -v nvidia-smi >/dev/null 2>&1 \
      && [ -z "${CUDA_VISIBLE_DEVICES:-}" ]; then
    echo 0
    return
  fi
  "$PYTHON" -c 'import sys
from gpt_train.distributed import cuda_device_count
from gpt_train.errors import UserError
try:
    print(cuda_device_count())
except UserError as e:
    sys.exit(f"gpt-train-entrypoint: {e}")'
}

# True when the arguments ask for the CPU: train.device=cpu (or its short form device=cpu).
wants_cpu() {
  local arg
  for arg in "$@"; do
    case $arg in
      train.device=cpu | device=cpu) return 0 ;;
    esac
  done
  return 1
}

# gpt-train's own commands (train, prepare, generate, export, ...), read from its CLI.
commands=$("$PYTHON" -c 'from gpt_train.cli import COMMANDS; print(" ".join(COMMANDS))')

if [ $# -gt 0 ] && [ "$1" = train ]; then
  shift
elif [ $# -gt 0 ] && [[ " $commands " == *" $1 "* ]]; then
  launch "$PYTHON" -m gpt_train "$@"
elif [ $# -gt 0 ] && [[ "$1" != -* && "$1" != *=* && "$1" != *.yaml && "$1" != *.yml ]] && [ ! -e "$1" ] \
    && command -v "$1" >/dev/null 2>&1; then
  launch "$@"   # a program: bash, python3, nvidia-smi, torchrun ...
fi

# From here on: training, with "$@" = [CONFIG] [key=value ...]
if [ -n "${NPROC_PER_NODE:-}" ]; then
  [[ "$NPROC_PER_NODE" =~ ^[1-9][0-9]*$ ]] || { say "NPROC_PER_NODE must be a positive integer, got '$NPROC_PER_NODE'"; exit 2; }
  procs=$NPROC_PER_NODE
  why="NPROC_PER_NODE=$procs"
elif wants_cpu "$@"; then
  procs=0
  why="train.device=cpu"
else
  procs=$(gpu_count) || exit 1
  why="$procs visible GPU(s)"
fi
extra=()
if [ -n "${TORCHRUN_ARGS:-}" ]; then
  read -r -a extra <<<"$TORCHRUN_ARGS"
fi

if [ "$procs" -eq 0 ] && [ ${#extra[@]} -eq 0 ]; then
  if [ "$why" = train.device=cpu ]; then
    say "train.device=cpu: training in one process on CPU"
  else
    say "no GPU visible: training in one process on CPU"
  fi
  launch "$PYTHON" -m gpt_train.supervise --ranks 1 -- "$PYTHON" -m gpt_train train "$@"
fi
[ "$procs" -gt 0 ] || procs=1

if [ -z "${OMP_NUM_THREADS:-}" ]; then
  cpus=$(nproc)
  OMP_NUM_THREADS=$(( cpus / procs > 0 ? cpus / procs : 1 ))
  export OMP_NUM_THREADS
fi
# One node: --standalone (rendezvous on a free local port), over 127.0.0.1 where torchrun has --local-addr: that
# works even where the container's hostname does not resolve (--network none, some CNI setups).
if [ ${#extra[@]} -eq 0 ]; then
  extra=(--standalone)
  if "$PYTHON" -c 'import inspect, sys, torch.distributed.run as r; sys.exit("--local-addr" not in inspect.getsource(r))' \
      2>/dev/null; then
    extra+=(--local-addr=127.0.0.1)
  fi
fi
say "$why: torchrun --nproc-per-node=$procs, OMP_NUM_THREADS=$OMP_NUM_THREADS"
torchrun=(torchrun)
command -v torchrun >/dev/null 2>&1 || torchrun=("$PYTHON" -m torch.distributed.run)
read -r -a flags <<<"$("$PYTHON" -m gpt_train.supervise --torchrun-flags)"
# gpt_train.supervise: the ranks started again after a crash or a hang, and the job's exit code from theirs (75 for
# a checkpointed stop, which torchrun alone would report as 1), by the rules of the SLURM batch shell.
launch "$PYTHON" -m gpt_train.supervise --ranks "$procs" -- \
  "${torchrun[@]}" --nproc-per-node="$procs" "${extra[@]}" "${flags[@]}" -m gpt_train train "$@"
