#!/usr/bin/env bash
# Installs the test requirements, then runs the whole pytest suite (CPU; about 10 minutes on 2 cores).
# Arguments go to pytest: bash run_tests.sh -m "not slow" leaves out the tests of more than ~20 s.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
python3 -m pytest -q "$@"  # pytest.ini: testpaths = tests when no path is given
