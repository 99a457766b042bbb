#!/usr/bin/env bash
# Full training on the 8 devices of this machine with torchrun (RANK_SIZE or --nproc: another count).
# Usage: bash test/train_full_8p.sh --data_path=DIR [--arch=xception] [--key=value ...] [-- main.py options]
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

MZ_LAUNCH="local"
MZ_KIND="acc"
MZ_OPTIONS="data_path arch batch_size epochs workers nproc"
MZ_MAIN_ARGS=(--amp --seed 49)
mz_main "$@"
