#!/usr/bin/env bash
# Sets everything up on a fresh machine, then runs one job:
#   bash bootstrap.sh demo   # train EMCAD through nnU-Net on real data for a few minutes; Dice and overlays
#   bash bootstrap.sh test   # the test suite (what CI runs); extra arguments go to pytest
# Set-up: a virtual environment in .venv (or $NNUNET_EMCAD_VENV) with PyTorch ($TORCH_PACKAGES, default
# torch==2.14.1 torchvision==0.29.1), nnU-Net and this package (editable). Repeated runs reuse it.
set -euo pipefail
cd "$(dirname "$0")"
venv=${NNUNET_EMCAD_VENV:-.venv}
python=${PYTHON:-python3}
log="$venv/install.log"

install() {
  if ! "$venv/bin/pip" "$@" >>"$log" 2>&1; then
    tail -n 30 "$log" >&2
    echo "bootstrap: pip $* failed; full log in $log" >&2
    exit 1
  fi
}

byte_compile() {
  # pip installs with --no-compile: it byte-compiles on one core, compileall on every core. A file in a newer
  # Python's syntax (torch ships one) fails to compile here as under pip; nothing imports it
  local site
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
  "$venv/bin/python" -m compileall -q -j 0 "$site" >>"$log" 2>&1 || true
}

if [ ! -x "$venv/bin/python" ]; then
  echo "bootstrap: creating $venv with $($python --version 2>&1)"
  "$python" -m venv "$venv"
fi
if ! "$venv/bin/python" -c 'import torch, torchvision' >/dev/null 2>&1; then
  echo "bootstrap: installing PyTorch (log: $log)"
  # shellcheck disable=SC2086
  install install --no-compile ${TORCH_PACKAGES:-torch==2.14.1 torchvision==0.29.1}
  byte_compile
fi
stamp="$venv/.nnunet_emcad_installed"
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ]; then
  echo "bootstrap: installing nnunet-emcad and its dependencies (log: $log)"
  install install --no-compile -e '.[test,demo,onnx]'
  byte_compile
  touch "$stamp"
fi

job=${1:-}
[ $# -gt 0 ] && shift
export nnUNet_def_n_proc=${nnUNet_def_n_proc:-2} nnUNet_n_proc_DA=${nnUNet_n_proc_DA:-2}
case "$job" in
  demo) exec "$venv/bin/nnunet-emcad" demo "$@" ;;
  test) exec "$venv/bin/python" -m pytest -ra "$@" ;;
  *) echo "usage: bash bootstrap.sh demo|test [args]" >&2; exit 2 ;;
esac
