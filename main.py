"""Train or evaluate Inception v3 / Xception on ImageNet-style data.

    python main.py -a inception_v3 --data /data/imagenet --amp
    torchrun --nproc_per_node 8 main.py -a xception --data /data/imagenet --amp
    python main.py -a xception --dummy --epochs 2          # no data set needed

``python main.py -h`` lists every option by topic; README.md explains them.
"""
import sys

if __name__ == "__main__":
    try:
        from training.run import main

        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C while torch loads, before the run handles it itself
        sys.exit(130)
