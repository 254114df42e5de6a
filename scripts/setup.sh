#!/usr/bin/env bash
# Sets up kdcache on a fresh Debian machine: system packages ffcv needs, the
# Fashion-MNIST data package, a venv in .venv with kdcache installed editable.
# Idempotent: each step is skipped when its result is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES="libopencv-dev libturbojpeg0-dev pkg-config dataset-fashion-mnist"
VENV="${KDCACHE_VENV:-.venv}"
EXTRAS="${1:-test}"

missing=""
for p in $APT_PACKAGES; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "[setup] installing system packages:$missing"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi

PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating venv $VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
fi

stamp="$VENV/.kdcache-installed-$EXTRAS"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[setup] installing kdcache[$EXTRAS] and dependencies into $VENV (first time: a few minutes)"
  # numpy and cython first: ffcv's setup.py imports them at build time.
  "$VENV/bin/python" -m pip install -q "numpy>=1.26" cython pkgconfig
  "$VENV/bin/python" -m pip install -q --no-build-isolation -e ".[$EXTRAS]"
  touch "$stamp"
fi
"$VENV/bin/python" -c "import kdcache, torch, torchvision, ffcv, zarr; print('[setup] ok: kdcache', kdcache.__version__, 'torch', torch.__version__, 'zarr', zarr.__version__)"
