"""Map ImageNet's HF parquet files to the ``image_{file_idx}_{idx}.jpg`` names of VARGPT's ImageNet-Instruct files.

Writes an index (parquet: name, parquet_file, row, original_path, prefix, label) and, with --extract-to,
the images themselves under those names (original JPEG bytes; resumable), so the ImageNet-Instruct files then
convert with data_prep/sharegpt_to_shards.py --image-root <that folder>. VARGPT numbered the files in
``glob.glob`` order, which is the folder's listing order: --order listing reproduces it where the listing
matches, --order sorted (default) is the reproducible choice (see vargpt/data/imagenet.py).

    python data_prep/imagenet_parquet_index.py --parquet-dir ImageNet/data --out data/imagenet/index.parquet \\
        --extract-to data/imagenet/images --workers 8
"""

import argparse
import sys
from pathlib import Path

from vargpt.data.imagenet import ORDERS, extract_images, imagenet_files, write_index


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parquet-dir", type=Path, required=True, help="folder of ILSVRC/imagenet-1k train-*.parquet")
    parser.add_argument("--out", type=Path, required=True, help="index file to write (.parquet)")
    parser.add_argument("--order", choices=ORDERS, default="sorted", help="file_idx order (default sorted)")
    parser.add_argument("--extract-to", type=Path, default=None, help="also write the images under their names")
    parser.add_argument("--workers", type=int, default=1, help="extraction processes")
    args = parser.parse_args(argv)
    files = imagenet_files(args.parquet_dir, args.order)
    count = write_index(files, args.out)
    print(f"indexed {count} images of {len(files)} files -> {args.out}")
    if args.extract_to is not None:
        written = extract_images(files, args.extract_to, args.workers)
        print(f"extracted {written} images (others were already there) -> {args.extract_to}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
