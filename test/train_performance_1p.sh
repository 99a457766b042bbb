#!/usr/bin/env bash
# Throughput on one device: one epoch cut to 1000 steps, mixed precision.
# Usage: bash test/train_performance_1p.sh --data_path=DIR [--arch=xception] [--key=value ...] [-- main.py options]
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

MZ_LAUNCH="single"
MZ_KIND="perf"
MZ_OPTIONS="data_path arch batch_size epochs workers device_id"
MZ_MAIN_ARGS=(--amp --seed 49 --epochs 1 --max-steps 1000)
mz_main "$@"
