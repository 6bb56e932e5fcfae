"""Convert LLaVA-1.5 annotations to shards.

The LLaVA format (``llava_v1_5_mix665k.json``, ``blip_laion_cc_sbu_558k.json``) is a JSON list of
``{id, image?, conversations: [{from: human|gpt, value}]}`` with ``<image>`` in the human turn; text-only
samples have no ``image``. Image paths are relative to --image-root (e.g. ``coco/train2017/...``).

    python data_prep/llava_to_shards.py --annotations llava_v1_5_mix665k.json --image-root data/llava \\
        --out data/shards/llava_v1_5_mix665k --workers 8
    python data_prep/verify_shards.py data/shards/llava_v1_5_mix665k
"""

import sys

from vargpt.data.dataset_formats import annotation_cli

if __name__ == "__main__":
    sys.exit(annotation_cli(sys.argv[1:], __doc__))
