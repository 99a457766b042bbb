#!/usr/bin/env bash
# Throughput across machines: run it on every node with its --node_rank; one epoch cut to 1000 steps.
# Usage: bash test/train_performance_multinodes.sh --data_path=DIR [--arch=xception] [--key=value ...] [-- main.py options]
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

MZ_LAUNCH="multinode"
MZ_KIND="perf"
MZ_OPTIONS="data_path arch batch_size epochs workers nnodes node_rank master_addr master_port local_addr nproc"
MZ_MAIN_ARGS=(--amp --seed 49 --epochs 1 --max-steps 1000)
mz_main "$@"
