#!/usr/bin/env bash
# Train one style LoRA. With no arguments: demo style 01 on the built-in pretrained tiny model
# (configs/demo.toml), then a before/after hist table and a side-by-side PNG (outputs/demo/before_after.png).
#   bash train.sh                                  # the demo
#   bash train.sh --styles 01 --max-train-steps 50 # any option overrides the config
#   bash train.sh --config my.toml --dry-run       # print captions, plan, parameter counts, memory
#   bash train.sh --resume latest                  # continue an interrupted run
#   bash train.sh --nproc 4                        # data parallel: execs mpirun -np 4 (one rank per GPU,
#                                                  # else the CPU cores split); or: mpirun -np 4 bash train.sh
# Relative paths (--config, --data-root, --output-dir, ...) are taken from the repository root.
set -euo pipefail
cd "$(dirname "$0")"
config=configs/demo.toml
nproc=""
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --config) config="$2"; shift 2 ;;
        --config=*) config="${1#--config=}"; shift ;;
        --nproc) nproc="$2"; shift 2 ;;
        --nproc=*) nproc="${1#--nproc=}"; shift ;;
        *) args+=("$1"); shift ;;
    esac
done
# Under mpirun every rank runs this script: one draws the demo styles, the others wait on the lock.
[ -d styles/00 ] || flock styles.lock bash -c '[ -d styles/00 ] || python -m tools.make_demo_styles'
if [ -n "$nproc" ] && [ -z "${OMPI_COMM_WORLD_SIZE:-}" ]; then
    case "$nproc" in ''|*[!0-9]*|0) echo "error: --nproc needs a positive number, got '$nproc'" >&2; exit 2 ;; esac
    if ! command -v mpirun >/dev/null; then
        echo "error: --nproc needs OpenMPI's mpirun (Debian/Ubuntu: apt-get install openmpi-bin libopenmpi-dev)" >&2
        exit 2
    fi
    mpi=(-np "$nproc" --oversubscribe --bind-to none)   # ranks bind themselves (jdiffusion_lora/_runtime.py)
    [ "$(id -u)" != 0 ] || mpi+=(--allow-run-as-root)
    exec mpirun "${mpi[@]}" bash "$PWD/$(basename "$0")" --config "$config" ${args[@]+"${args[@]}"}
fi
exec python -m jdiffusion_lora.cli train --config "$config" ${args[@]+"${args[@]}"}
