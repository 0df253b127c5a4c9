#!/usr/bin/env bash
# The MONAI Label environment: a venv of its own, separate from the main (CPU-wheel) test venv.
#
# It also installs Debian's chromium when it is missing (as root), for the review page's browser test.
#
# Why separate: monailabel 0.8.5 imports torchvision, and the registry's torchvision only loads with the
# registry's own torch build, not the local CPU wheel torch==2.13.0 the main venv uses. monailabel 0.8.5
# also needs three pins to start (pydicom 2.4.4, dicomweb-client 0.59.1, pynetdicom 2.0.2).
#
# Versions come from the repository's lock file, constraints.txt, like the main venv's, with the lines marked
# "monailabel-env:" there replacing the main pins of torch (this venv takes the registry build that its
# torchvision loads with) and numpy (monailabel's numpymaxflow and pydicom-seg need numpy<2).
#
# Idempotent: a venv made from the same lock file, pyproject.toml, script and checkout is left as it is (a stamp file in
# the venv records them), so the README's test command can call this every time; anything else remakes it.
# Measured: see CONTRIBUTING.md, "The two environments" (time, wheels, disk).
#
# Usage: tools/setup_monailabel.sh [--check] [VENV_DIR]     (default: .venv-monailabel at the repo root)
#        --check: only say whether VENV_DIR is up to date (exit 0) or would be remade (exit 1)
# The tests find this venv's python at .venv-monailabel/bin/python or at $MONAILABEL_PYTHON.
set -euo pipefail
check_only=0
if [ "${1:-}" = "--check" ]; then check_only=1; shift; fi
REPO="$(cd "$(dirname "$0")/.." && pwd)"
VENV="$(realpath -m "${1:-$REPO/.venv-monailabel}")"   # a path given relative to where it is called from
cd "$REPO"

# The review page's browser test (tests/test_monailabel_server.py) drives Debian's chromium through
# Playwright, which never downloads a browser of its own here: install the system package when it is missing.
if [ "$check_only" = 0 ] && [ -z "${CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "warning: no chromium here; the review page's browser test needs it: run 'sudo apt-get install chromium'" \
             "or set CHROMIUM to a Chromium binary" >&2
    fi
fi

stamp="$(cat constraints.txt pyproject.toml tools/setup_monailabel.sh | sha256sum | cut -d' ' -f1) repo=${REPO}"
if [ -x "$VENV/bin/python" ] && [ -f "$VENV/.surgical-sam-stamp" ] && [ "$(cat "$VENV/.surgical-sam-stamp")" = "$stamp" ]; then
    echo "MONAI Label environment $VENV is up to date (constraints.txt unchanged)"
    exit 0
fi
if [ "$check_only" = 1 ]; then
    echo "MONAI Label environment $VENV is missing or was made from another lock file, script or checkout"
    exit 1
fi

rm -rf "$VENV"
python3 -m venv "$VENV"
# The lock file with this venv's own pins in place of the main ones.
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
overrides="$(sed -n 's/^# monailabel-env: //p' constraints.txt)"
grep -v -E "^($(echo "$overrides" | sed 's/==.*//' | paste -sd'|'))==" constraints.txt >"$constraints"
echo "$overrides" >>"$constraints"
# PIP_FIND_LINKS is emptied so the local CPU wheel in a find-links folder cannot be picked.
export PIP_FIND_LINKS=""
"$VENV/bin/python" -m pip install --quiet --no-input -c "$constraints" pip
# One resolve: torch and torchvision from the registry (a matching pair), monailabel with the three pins it
# needs to start, and this repository (the bundle's `scripts` package plus monai, segment-anything, ...).
"$VENV/bin/python" -m pip install --quiet --no-input -c "$constraints" \
    torch torchvision monailabel pydicom dicomweb-client pynetdicom -e ".[test]"
"$VENV/bin/python" -c "import torch, torchvision, monailabel, monai, scripts; print('monailabel', monailabel.__version__, 'torch', torch.__version__, 'torchvision', torchvision.__version__, 'monai', monai.__version__)"
echo "$stamp" >"$VENV/.surgical-sam-stamp"
