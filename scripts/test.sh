#!/usr/bin/env bash
# The whole test suite: ruff (lint and format), mypy, pytest on TransformerLens 4.x (two workers),
# then the tests marked `tl3` again on TransformerLens 3.x. Prints each summary and a combined
# closing line.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT  # the junit files are read at the end; nothing is left behind
status=0
echo "== ruff"
.venv/bin/ruff check . || status=1
.venv/bin/ruff format --check --quiet . || status=1
echo "== mypy"
.venv/bin/python -m mypy || status=1
echo "== pytest (TransformerLens 4.x)"
.venv/bin/python -m pytest -q -p no:cacheprovider -n 2 --junitxml="$out/tl4.xml" "$@" || status=1
echo "== pytest -m tl3 (TransformerLens 3.x)"
.venv-tl3/bin/python -m pytest -q -p no:cacheprovider -m tl3 --junitxml="$out/tl3.xml" \
  -W ignore::DeprecationWarning "$@" || status=1
python3 - "$out" <<'PY'
import sys, pathlib, xml.etree.ElementTree as ET
passed = failed = skipped = 0
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.xml")):
    for s in ET.parse(f).getroot().iter("testsuite"):
        t, fl, er, sk = (int(s.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
        passed += t - fl - er - sk; failed += fl + er; skipped += sk
print(f"total: {passed} passed, {failed} failed, {skipped} skipped")
PY
exit $status
