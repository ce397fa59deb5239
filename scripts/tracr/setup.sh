#!/usr/bin/env bash
# Create (or reuse) .venv-tracr, the script-only environment that compiles RASP programs with tracr
# (scripts/tracr/compile_programs.py). jax and tracr live only here: the tl-noise package never
# imports them, it loads the exported safetensors + JSON. torch is not installed here.
#
#   scripts/tracr/setup.sh
#   .venv-tracr/bin/python scripts/tracr/compile_programs.py
#
# A stamp file records the hash of this script (which holds the pins), so a second call with nothing
# changed returns at once.
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=.venv-tracr
packages=(tracr-pypi==1.0.0 jax==0.10.2 jaxlib==0.10.2 dm-haiku==0.0.17 chex==0.1.92 safetensors numpy)
stamp="$venv/.tracr-stamp"
want="$(sha256sum scripts/tracr/setup.sh | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/python" ]; then
  exit 0
fi
echo "[tracr] installing $venv" >&2
python3.11 -m venv "$venv"
log="$venv/setup.log"
pip="$venv/bin/python -m pip --disable-pip-version-check -q"
step() {  # run one install step, keeping pip's chatter in the log unless it fails
  echo "[tracr] pip install $*" >&2
  if ! $pip install "$@" >>"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "[tracr] failed; full log: $log" >&2
    exit 1
  fi
}
step --upgrade pip
step "${packages[@]}"
echo "$want" > "$stamp"
echo "[tracr] $venv ready" >&2
