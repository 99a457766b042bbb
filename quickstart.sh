#!/usr/bin/env bash
# Installs the requirements, trains Xception on the embedded synthetic data set (no ImageNet
# needed), evaluates the best checkpoint and runs the demo; it says what to expect first and what
# was reached last. ARCH=inception_v3 bash quickstart.sh trains Inception v3 instead; extra
# arguments go to main.py.
set -euo pipefail
cd "$(dirname "$0")"
arch="${ARCH:-xception}"
output="output/quickstart_${arch}"
cat <<EOF
quickstart: trains ${arch} from scratch for 5 epochs on a generated data set of 10 classes of
coloured shapes (480 training and 160 validation images at 96 px), evaluates the best checkpoint
and classifies demo/sample.jpg with it. Expect 1 to 3 minutes on 2 idle cores of an AMD EPYC
(Xception trains at 20 to 50 images/s on the two kinds of EPYC measured; longer on busy cores,
shorter on an accelerator) and a best validation Acc@1 far above chance (10 %): from 60 % to
97.5 % in four runs there (each run draws its own seed). The first validation loss can be huge:
a note in the log explains it.
EOF
python3 -m pip install --quiet --disable-pip-version-check -r requirements.txt
SECONDS=0
python3 main.py -a "$arch" --dummy --output_dir "$output" --resume auto "$@"  # run again: says it is finished
python3 main.py -a "$arch" --dummy --evaluate --resume "$output/model_best.pth.tar" --output_dir "$output/eval"
python3 demo.py --checkpoint "$output/model_best.pth.tar"
python3 - "$output" "$SECONDS" <<'EOF'
import json
import sys
from pathlib import Path

output, seconds = Path(sys.argv[1]), int(sys.argv[2])
records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if line.strip()]
last = [record for record in records if record.get("mode") == "train"][-1]
print(f"reached: best validation Acc@1 {last['best_acc1']:.2f} % after {last['epoch']} of {last['epochs']} epochs "
      f"(chance: 10 %), {seconds // 60} min {seconds % 60} s for training, evaluation and demo; checkpoints, "
      f"metrics.jsonl and curves.png are in {output}/")
EOF
