"""The Xception ModelZoo scripts' name for the multi-device entry point: the same as main.py.

    python main-8p.py -a xception --data_path /data/imagenet --multiprocessing-distributed ...
"""
import sys

if __name__ == "__main__":
    try:
        from training.run import main

        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C while torch loads, before the run handles it itself
        sys.exit(130)
