#!/usr/bin/env bash
# The oldest Python that pyproject.toml's requires-python promises (3.9): install the package with its
# dependencies into a venv of that Python, import every module, and run `train --dry-run` (Jittor builds
# and runs the tiny model's modules under it). The venv and Jittor's compiled core are kept in ~/.cache,
# so only the first run pays the install and Jittor's one-time compile (about 10 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."

want=3.9
python=""
for candidate in "$(command -v "python$want" || true)" "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$want".*/bin/"python$want"; do
    if [ -n "$candidate" ] && [ -x "$candidate" ] && "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 9)' 2>/dev/null; then
        python="$candidate"
        break
    fi
done
if [ -z "$python" ]; then
    echo "oldest Python: no python$want on this machine (tried PATH and pyenv); nothing checked" >&2
    exit 1
fi
base=$("$python" -c 'import sys; print(sys.base_prefix)')
venv="${XDG_CACHE_HOME:-$HOME/.cache}/jdiffusion-lora/venv-py$want"
echo "== oldest Python: $("$python" --version) at $python, venv $venv"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/pip" install -q -e . 2>&1 | grep -v -e "^WARNING: Location" -e "DEPRECATION" || true
# Jittor finds python3.9-config next to the interpreter; a venv has none.
export python_config_path="$base/bin/python$want-config"
"$venv/bin/python" -c 'import tomli, jdiffusion_lora; print("tomli", tomli.__version__)'
"$venv/bin/python" - <<'EOF'
import importlib
import pkgutil
import sys

import jdiffusion_lora

names = [m.name for m in pkgutil.walk_packages(jdiffusion_lora.__path__, "jdiffusion_lora.")
         if not m.name.endswith("__main__")]
for name in names:
    importlib.import_module(name)
print(f"imported {len(names)} modules under Python {sys.version.split()[0]}")
EOF
"$venv/bin/python" -W ignore::UserWarning -m jdiffusion_lora.cli train --dry-run --max-train-steps 2 | tail -n 3
echo "== oldest Python: ok"
