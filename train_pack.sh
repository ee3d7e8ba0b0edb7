#!/usr/bin/env bash
# Train a pack of styles as one LoRA of rank (number of styles) x rank. With no arguments: the three
# demo styles on the built-in tiny model (configs/demo_pack.toml). The seed's 28-style recipe:
#   bash train_pack.sh --config configs/jittor-2024-pack.toml --base-model /models/sd21 --data-root /data/B
# Options as in train.sh (any config key: --styles 00,03,07 --rank 8 --dry-run --resume latest ...);
# a --config given here replaces the pack default (train.sh keeps the last --config it sees).
set -euo pipefail
exec bash "$(dirname "$0")/train.sh" --config configs/demo_pack.toml "$@"
