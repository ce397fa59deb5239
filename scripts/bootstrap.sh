#!/usr/bin/env bash
# Create (or reuse) a virtual environment inside the repository and install tl-noise into it.
#
#   scripts/bootstrap.sh .venv      TransformerLens 4.x (TransformerBridge) + app, notebook, dev extras
#   scripts/bootstrap.sh .venv-tl3  TransformerLens 3.x (HookedTransformer), for the 3.x test pass
#
# torch is installed first and pinned (constraints.txt) so that pip takes the cached CPU wheel
# instead of resolving a newer CUDA build. A stamp file records the hash of the install inputs, so a
# second call with nothing changed returns in well under a second.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
case "$venv" in
  .venv) tl_spec="transformer-lens>=4.3,<5"; extras="[app,notebooks,dev]" ;;
  .venv-tl3) tl_spec="transformer-lens>=3.9,<4"; extras="[dev]" ;;
  *) echo "bootstrap.sh: unknown environment '$venv' (expected .venv or .venv-tl3)" >&2; exit 2 ;;
esac
stamp="$venv/.tl-noise-stamp"
want="$(cat pyproject.toml constraints.txt scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/python" ]; then
  exit 0
fi
echo "[bootstrap] installing $venv (first run: a few minutes, about 1.7 GB)" >&2
python3 -m venv "$venv"
log="$venv/bootstrap.log"
pip="$venv/bin/python -m pip --disable-pip-version-check -q"
step() {  # run one install step, keeping pip's chatter in the log unless it fails
  echo "[bootstrap] pip install $*" >&2
  if ! $pip install "$@" >>"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "[bootstrap] failed; full log: $log" >&2
    exit 1
  fi
}
step --upgrade pip
step -c constraints.txt torch==2.13.0
step -c constraints.txt "$tl_spec"
step -c constraints.txt -e ".$extras"
echo "$want" > "$stamp"
echo "[bootstrap] $venv ready" >&2
