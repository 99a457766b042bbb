#!/usr/bin/env bash
# Throughput on the 8 devices of this machine: one epoch cut to 1000 steps, mixed precision.
# Usage: bash test/train_performance_8p.sh --data_path=DIR [--arch=xception] [--key=value ...] [-- main.py options]
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

MZ_LAUNCH="local"
MZ_KIND="perf"
MZ_OPTIONS="data_path arch batch_size epochs workers nproc"
MZ_MAIN_ARGS=(--amp --seed 49 --epochs 1 --max-steps 1000)
mz_main "$@"
