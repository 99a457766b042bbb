#!/usr/bin/env bash
# Installs the test requirements, then runs the whole pytest suite (CPU; a few minutes).
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
python3 -m pytest -q tests "$@"
