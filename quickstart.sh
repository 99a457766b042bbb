#!/usr/bin/env bash
# Installs the requirements, trains Xception on the embedded synthetic data set (no ImageNet
# needed, about two CPU minutes), evaluates the best checkpoint and runs the demo.
# ARCH=inception_v3 bash quickstart.sh trains Inception v3 instead; extra arguments go to main.py.
set -euo pipefail
cd "$(dirname "$0")"
arch="${ARCH:-xception}"
output="output/quickstart_${arch}"
python3 -m pip install --quiet --disable-pip-version-check -r requirements.txt
python3 main.py -a "$arch" --dummy --output_dir "$output" --resume auto "$@"  # run again: says it is finished
python3 main.py -a "$arch" --dummy --evaluate --resume "$output/model_best.pth.tar" --output_dir "$output/eval"
python3 demo.py --checkpoint "$output/model_best.pth.tar"
