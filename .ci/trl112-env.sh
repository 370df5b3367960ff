#!/usr/bin/env bash
# Install TRL 1.12.0 (the last release with PPOTrainer, as trl.experimental.ppo) into .trl112/ at the repo root,
# an isolated --target dir used only by the PPO parity test and benchmarks/ppo_step.py: they put it FIRST on
# sys.path in a subprocess, beside the project venv's transformers/torch. The project venv is never modified.
# Idempotent. Usage: bash .ci/trl112-env.sh [PROJECT_PYTHON]   (default: $PYTHON, else `python`)
set -euo pipefail
PY="${1:-${PYTHON:-python}}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARGET="$ROOT/.trl112"
check() {
    "$PY" -c "import sys; sys.path.insert(0, '$TARGET'); import trl
assert trl.__version__ == '1.12.0', trl.__version__
from trl.experimental.ppo import PPOTrainer, PPOConfig
print('trl112-env: trl', trl.__version__, 'PPOTrainer OK')" 2>/dev/null
}
if [ -d "$TARGET/trl" ] && check; then
    [ -f "$TARGET/.gitignore" ] || printf '*\n' > "$TARGET/.gitignore"
    echo "trl112-env: $TARGET already provides trl 1.12.0; nothing to do"
    exit 0
fi
rm -rf "$TARGET"
"$PY" -m pip install --quiet --disable-pip-version-check --no-deps --target "$TARGET" "trl==1.12.0"
printf '*\n' > "$TARGET/.gitignore"  # keep the installed files out of git status
check || { echo "trl112-env: ERROR: trl 1.12.0 does not import beside the project venv" >&2; exit 1; }
