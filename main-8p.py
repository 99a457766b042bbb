"""The Xception ModelZoo scripts' name for the multi-device entry point: the same as main.py.

    python main-8p.py -a xception --data_path /data/imagenet --multiprocessing-distributed ...
"""
import sys

from training.run import main

if __name__ == "__main__":
    sys.exit(main())
