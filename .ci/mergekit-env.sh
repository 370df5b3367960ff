#!/usr/bin/env bash
# Create .mergekit-venv/ at the repo root: mergekit 0.1.5 as a differential-test oracle.
# The child venv reuses the project venv's packages (torch, transformers, ...) through a .pth file,
# so pip installs only what mergekit needs beyond them, and the project venv is never modified.
# Usage: bash .ci/mergekit-env.sh [PROJECT_PYTHON]   (default: $PYTHON, else `python`)
set -euo pipefail
PY="${1:-${PYTHON:-python}}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.mergekit-venv"
START=$(date +%s)

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import mergekit.merge_methods" 2>/dev/null; then
    echo "mergekit-env: $VENV already provides mergekit; nothing to do"
    exit 0
fi

PARENT_SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
PARENT_PLAT="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')"
BEFORE="$(mktemp)"; AFTER="$(mktemp)"
trap 'rm -f "$BEFORE" "$AFTER"' EXIT
"$PY" -m pip freeze --all > "$BEFORE"

"$PY" -m venv "$VENV"
CHILD_SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# A .pth line is appended to sys.path after the child's own site-packages: child packages win.
{ echo "$PARENT_SITE"; [ "$PARENT_PLAT" != "$PARENT_SITE" ] && echo "$PARENT_PLAT"; true; } \
    > "$CHILD_SITE/_project_venv.pth"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "mergekit==0.1.5"
"$VENV/bin/python" -c "import mergekit.merge_methods, torch; print('mergekit-env: mergekit OK, torch', torch.__version__)"

"$PY" -m pip freeze --all > "$AFTER"
if ! diff -q "$BEFORE" "$AFTER" >/dev/null; then
    echo "mergekit-env: ERROR: the project venv changed:" >&2
    diff "$BEFORE" "$AFTER" >&2 || true
    exit 1
fi
echo "mergekit-env: project venv untouched; done in $(( $(date +%s) - START )) s"
