#!/usr/bin/env bash
# The MONAI Label environment: a venv of its own, separate from the main (CPU-wheel) test venv.
#
# Why separate: monailabel 0.8.5 imports torchvision, and the registry's torchvision only loads with the
# registry's own torch build, not the local CPU wheel torch==2.13.0 the main venv uses. monailabel 0.8.5
# also needs three pins to start (pydicom 2.4.4, dicomweb-client 0.59.1, pynetdicom 2.0.2).
#
# Measured here (2 cores): 187 distributions, 3.62 GB of wheels (torch's CUDA build and its nvidia-* wheels
# are most of it), 5 min 15 s for the whole script, 8.2 GB on disk.
#
# Usage: tools/setup_monailabel.sh [VENV_DIR]     (default: .venv-monailabel at the repo root)
# The tests find this venv's python at .venv-monailabel/bin/python or at $MONAILABEL_PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-monailabel}"
TORCH_VERSION="${MONAILABEL_TORCH_VERSION:-2.14.1}"
TORCHVISION_VERSION="${MONAILABEL_TORCHVISION_VERSION:-0.29.1}"

python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# One resolve: torch and torchvision from the registry (a matching pair), monailabel with the pins,
# and this repository (the bundle's `scripts` package plus monai, segment-anything, ...).
# PIP_FIND_LINKS is emptied so the local CPU wheel in a find-links folder cannot be picked.
PIP_FIND_LINKS="" "$VENV/bin/python" -m pip install --quiet --no-input \
    "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
    "monailabel==0.8.5" "pydicom==2.4.4" "dicomweb-client==0.59.1" "pynetdicom==2.0.2" \
    -e ".[test]"
"$VENV/bin/python" -c "import torch, torchvision, monailabel, monai, scripts; print('monailabel', monailabel.__version__, 'torch', torch.__version__, 'torchvision', torchvision.__version__, 'monai', monai.__version__)"
