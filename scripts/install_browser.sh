#!/usr/bin/env bash
# Debian's Chromium for the browser tests (tests/test_browser.py drives /usr/bin/chromium with
# Playwright; Playwright's own browser download is not used). Idempotent: does nothing when
# Chromium is already installed.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  echo "chromium present: $(/usr/bin/chromium --version 2>/dev/null || echo /usr/bin/chromium)"
  exit 0
fi
sudo=""
if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
$sudo apt-get update
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y chromium chromium-driver
/usr/bin/chromium --version
