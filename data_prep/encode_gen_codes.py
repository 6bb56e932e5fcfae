"""Encode the generation targets of a shard source once with the frozen VQ-VAE (precomputed VQ codes).

Writes a new source with the same samples (keys, records, understanding images) plus each ``<image_gen>`` image's
per-scale codes (``imgN.codes.npy``, L int16), next to its pixels or, with --drop-pixels, instead of them.
Targets are transformed as in evaluation (resize to --resize-ratio x R, VAR's 1.125 by default, then a centre
crop; pass the data.gen_resize_ratio you train with): training on codes has no random crop.
Resumable and idempotent like the other converters; the manifest's ``gen_codes`` block names the VQ-VAE.

    python data_prep/encode_gen_codes.py --input data/shards/imagenet_instruct_130k \\
        --weights /models/VARGPT_LLaVA-v1 --out data/shards/imagenet_instruct_130k_codes --device cuda
    python data_prep/encode_gen_codes.py --input data/shards/in130k --weights vae_ch160v4096z32.pth \\
        --model-config conf/model/vargpt_llava_7b.yaml --out data/shards/in130k_codes --drop-pixels
    python data_prep/verify_shards.py data/shards/imagenet_instruct_130k_codes

Then train on the new folder with ``data.gen_codes=true`` (its path in ``data.train_sources``).
"""

import argparse
import sys
from pathlib import Path

from vargpt.data.datasets_to_shards import add_output_args, options_from_args, run_cli
from vargpt.data.shards import MANIFEST_NAME
from vargpt.data.transforms import VAR_RESIZE_RATIO
from vargpt.inference.gen_codes import GenCodesConverter


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, required=True, help="source folder (manifest.json + shards)")
    parser.add_argument("--weights", required=True, help="VARGPT folder/checkpoint (its vae_local) or a VQ-VAE file")
    parser.add_argument("--model-config", default=None, help="conf/model YAML (default: the weights folder's)")
    parser.add_argument("--drop-pixels", action="store_true", help="store codes instead of the generation images")
    parser.add_argument("--batch-size", type=int, default=32, help="generation images per VQ-VAE call")
    parser.add_argument("--device", default="cpu", help="cpu | cuda (with cuda keep --workers 1)")
    parser.add_argument("--resize-ratio", type=float, default=VAR_RESIZE_RATIO, help="= data.gen_resize_ratio")
    add_output_args(parser)
    args = parser.parse_args(argv)
    if not (args.input / MANIFEST_NAME).is_file():
        parser.error(f"--input {args.input}: no {MANIFEST_NAME} there (a source folder written by data_prep/*.py)")
    converter = GenCodesConverter(
        args.input, args.weights, args.model_config, args.drop_pixels, args.batch_size, args.device, args.resize_ratio
    )
    return run_cli(converter, options_from_args(args))


if __name__ == "__main__":
    sys.exit(main())
