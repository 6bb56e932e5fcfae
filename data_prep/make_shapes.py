"""Build the shapes world: the embedded default data (shards, tokenizer, manifest), deterministically.

Training builds it by itself when missing (conf/data/shapes.yaml); run this to build it ahead, elsewhere or
at another size.

    python data_prep/make_shapes.py --out data/shapes --size 64 --train 20000 --val 1000 --seed 0 --workers 2
"""

import argparse
import json
import logging
import sys
from pathlib import Path

from vargpt.data.shapes import build_shapes_world


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="world folder")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--train", type=int, default=20000, help="training samples over all tasks")
    parser.add_argument("--val", type=int, default=1000, help="validation samples over all tasks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="rendering processes")
    parser.add_argument("--vocab-size", type=int, default=1000, help="upper bound of the tokenizer's size")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    path = build_shapes_world(
        args.out, args.size, args.train, args.val, args.seed, num_workers=args.workers, vocab_size=args.vocab_size
    )
    world = json.loads(path.read_text())
    print(f"shapes world at {args.out}: {world['build_seconds']} s, tokenizer of {world['tokenizer_size']} tokens")
    for name, source in world["sources"].items():
        print(f"  {name}: {source['num_samples']} samples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
