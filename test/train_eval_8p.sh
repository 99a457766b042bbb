#!/usr/bin/env bash
# Validation of a checkpoint (--resume_pth) on the 8 devices of this machine with torchrun.
# Usage: bash test/train_eval_8p.sh --data_path=DIR [--arch=xception] [--key=value ...] [-- main.py options]
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

MZ_LAUNCH="local"
MZ_KIND="eval"
MZ_OPTIONS="data_path arch batch_size resume_pth workers device_id nproc"
MZ_MAIN_ARGS=(--amp --seed 49 --evaluate)
mz_main "$@"
