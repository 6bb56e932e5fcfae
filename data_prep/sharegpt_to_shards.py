"""Convert VARGPT's own instruction files (LLaMA-Factory "sharegpt" JSON) to shards.

ImageNet-Instruct-class / -5k / -130k / -1270k and the stage-2 files: a JSON list (or JSON lines) of
``{messages: [{role, content}], images: [...]}`` with ``<image>`` in user turns and ``<image_gen>`` in assistant
turns (the ``conversations: [{from, value}]`` spelling is accepted too). ``images`` lists the files in
placeholder order, relative to --image-root (tried as given, then by file name). For the ImageNet-Instruct
files, first extract the ImageNet parquet images under the names they use (data_prep/imagenet_parquet_index.py).

    python data_prep/imagenet_parquet_index.py --parquet-dir ImageNet/data --out data/imagenet/index.parquet \\
        --extract-to data/imagenet/images
    python data_prep/sharegpt_to_shards.py --annotations stage3-sft/ImageNet-Instruct-130k.json \\
        --image-root data/imagenet/images --out data/shards/imagenet_instruct_130k --workers 8
"""

import sys

from vargpt.data.dataset_formats import annotation_cli

if __name__ == "__main__":
    sys.exit(annotation_cli(sys.argv[1:], __doc__))
