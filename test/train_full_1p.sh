#!/usr/bin/env bash
# Full training on one device (the recipe's epochs, mixed precision).
# Usage: bash test/train_full_1p.sh --data_path=DIR [--arch=xception] [--key=value ...] [-- main.py options]
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

MZ_LAUNCH="single"
MZ_KIND="acc"
MZ_OPTIONS="data_path arch batch_size epochs workers device_id"
MZ_MAIN_ARGS=(--amp --seed 49)
mz_main "$@"
