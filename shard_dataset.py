"""Convert an ImageFolder data set into the sharded streaming format (litdata chunks).

    python shard_dataset.py --data /data/imagenet --output /data/imagenet-shards
    python shard_dataset.py --dummy --output ./dummy-shards
    AWS_ENDPOINT_URL=<endpoint> python shard_dataset.py --data /data/imagenet --output s3://bucket/imagenet

The output (a folder, or an ``s3://``/``gs://`` prefix) gets ``train/``, ``val/`` and
``shards.json``; ``main.py --data OUTPUT`` recognises it. Images keep their original bytes;
classes, labels and checks are those of training on the ImageFolder itself.
"""
from __future__ import annotations

import argparse
import logging
import sys

from models.errors import UserError
from training.data.embedded import ensure_dummy_imagefolder
from training.data.shards import DEFAULT_CHUNK_BYTES, convert_imagefolder

log = logging.getLogger("shard_dataset")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", metavar="DIR", help="the ImageFolder to convert (train/ and val/ inside)")
    source.add_argument("--dummy", action="store_true", help="convert the embedded --dummy data set")
    parser.add_argument("--dummy-dir", metavar="DIR", default=None,
                        help="where --dummy keeps its data set (default: $XDG_CACHE_HOME/inception-xception)")
    parser.add_argument("--output", required=True, metavar="DEST",
                        help="a folder, or an object-store prefix (s3://bucket/path; the endpoint of an "
                             "S3-compatible store from AWS_ENDPOINT_URL)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the stored training order (default: 0)")
    parser.add_argument("--chunk-bytes", default=DEFAULT_CHUNK_BYTES,
                        help=f"size of one chunk file (default: {DEFAULT_CHUNK_BYTES})")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace what DEST holds (a finished or an interrupted conversion)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    from tqdm import tqdm

    try:
        data = args.data if args.data is not None else ensure_dummy_imagefolder(args.dummy_dir)
        with tqdm(unit="img", desc="images", disable=None) as bar:  # shown on a terminal only
            metadata = convert_imagefolder(data, args.output, seed=args.seed, overwrite=args.overwrite,
                                           chunk_bytes=args.chunk_bytes, progress=bar.update)
    except UserError as error:
        log.error("error: %s", error)
        return 1
    log.info("wrote %s: %d classes, %d training and %d validation images", args.output, len(metadata.classes),
             metadata.images["train"], metadata.images["val"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
