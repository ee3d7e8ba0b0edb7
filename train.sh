#!/usr/bin/env bash
# Train one style LoRA. With no arguments: demo style 01 on the built-in pretrained tiny model
# (configs/demo.toml), then a before/after hist table and a side-by-side PNG (outputs/demo/before_after.png).
#   bash train.sh                                  # the demo
#   bash train.sh --styles 01 --max-train-steps 50 # any option overrides the config
#   bash train.sh --config my.toml --dry-run       # print captions, plan, parameter counts, memory
#   bash train.sh --resume latest                  # continue an interrupted run
# Relative paths (--config, --data-root, --output-dir, ...) are taken from the repository root.
set -euo pipefail
cd "$(dirname "$0")"
config=configs/demo.toml
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --config) config="$2"; shift 2 ;;
        --config=*) config="${1#--config=}"; shift ;;
        *) args+=("$1"); shift ;;
    esac
done
[ -d styles/00 ] || python -m tools.make_demo_styles
exec python -m jdiffusion_lora.cli train --config "$config" ${args[@]+"${args[@]}"}
