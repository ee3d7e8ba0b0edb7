#!/usr/bin/env bash
# Train a pack of styles as one LoRA of rank (number of styles) x rank. With no arguments: the three
# demo styles on the built-in tiny model (configs/demo_pack.toml). The seed's 28-style recipe:
#   bash train_pack.sh --config configs/seed.toml --base-model /models/sd21 --data-root /data/B
# Options as in train.sh (any config key: --styles 00,03,07 --rank 8 --dry-run --resume latest ...).
# Relative paths (--config, --data-root, --output-dir, ...) are taken from the repository root.
set -euo pipefail
cd "$(dirname "$0")"
config=configs/demo_pack.toml
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --config) config="$2"; shift 2 ;;
        --config=*) config="${1#--config=}"; shift ;;
        *) args+=("$1"); shift ;;
    esac
done
[ -d styles/00 ] || python tools/make_demo_styles.py
exec python -m jdiffusion_lora.cli train --config "$config" ${args[@]+"${args[@]}"}
