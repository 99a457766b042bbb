#!/usr/bin/env bash
# Hardware acceptance of this machine: main.py's correctness checks and speed figures on
# whatever device is present (bench/acceptance.py; docs/PERFORMANCE.md says what each means).
# Usage: bash test/acceptance.sh [--quick] [--output DIR] [other bench/acceptance.py options]
# The report goes to ${TEST_OUTPUT_DIR:-test/output}/acceptance-<date>-<time>/ unless --output is given.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=SCRIPTDIR/env_npu.sh
source "$here/env_npu.sh"
output="${TEST_OUTPUT_DIR:-$here/output}/acceptance-$(date +%Y%m%d-%H%M%S)"
# A later --output (the user's) wins over this one.
exec "${PYTHON:-python3}" "$(dirname "$here")/bench/acceptance.py" --output "$output" "$@"
