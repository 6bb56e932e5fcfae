"""Convert LLaVA-OneVision-Data parquet files to shards.

Each row holds ``id``, ``image`` ({bytes, path}), ``conversations`` ([{from, value}]) and ``data_source``; the
image bytes are in the file (rows without bytes are read from --image-root/path when given). The data_source
of every sample is kept in its ``meta``.

    python data_prep/onevision_to_shards.py --parquet "LLaVA-OneVision-Data/*/*.parquet" \\
        --out data/shards/llava_onevision --workers 8
"""

import argparse
import glob
import sys
from pathlib import Path

from vargpt.data.dataset_formats import ParquetConverter
from vargpt.data.datasets_to_shards import add_output_args, options_from_args, run_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parquet", nargs="+", required=True, help="parquet files or glob patterns")
    parser.add_argument("--image-root", type=Path, default=None, help="root of image.path for rows without bytes")
    parser.add_argument("--source", default="llava_onevision", help="source name (default llava_onevision)")
    add_output_args(parser)
    args = parser.parse_args(argv)
    files = sorted({f for pattern in args.parquet for f in glob.glob(pattern)})
    if not files:
        parser.error(f"no parquet file matches {args.parquet}")
    return run_cli(ParquetConverter(files, args.source, args.image_root), options_from_args(args))


if __name__ == "__main__":
    sys.exit(main())
