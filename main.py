"""Train or evaluate Inception v3 / Xception on ImageNet-style data.

    python main.py -a inception_v3 --data /data/imagenet --amp
    torchrun --nproc_per_node 8 main.py -a xception --data /data/imagenet --amp
    python main.py -a xception --dummy --epochs 2          # no data set needed

``python main.py -h`` lists every option by topic; README.md explains them.

Exit status: 0 done (or nothing left to train), 1 an error (one line) or a bug (traceback),
2 bad options, 75 stopped by SIGTERM/SIGUSR1 after writing a checkpoint, 130 stopped by
Ctrl-C (a checkpoint at the first, at once at the second); docs/RESUME.md says what a
scheduler sees, plain and under torchrun.
"""
import sys

if __name__ == "__main__":
    try:
        from training.run import main

        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C while torch loads, before the run handles it itself
        sys.exit(130)
