"""Convert preference pairs in LLaMA-Factory's ranking sharegpt schema (VARGPT-v1.1's DPO data) to shards.

A JSON list (or JSON lines) of ``{conversations: [{from, value}], chosen: {from: gpt, value}, rejected: {...},
images: [...], system?}``: the prompt turns end on a human turn, ``chosen`` and ``rejected`` are one gpt message each
(``<image_gen>`` in them for image preferences), and ``images`` lists the prompt's images, then chosen's, then
rejected's, in placeholder order, relative to --image-root (tried as given, then by file name). Each pair becomes one
sample; bad pairs (malformed_pair, identical_pair, placeholder_mismatch, image_missing, ...) are skipped and counted
in the manifest. Train on the output with ``data=preference`` (data.pairs=true).

    python data_prep/preference_to_shards.py --annotations dpo_gen.json --image-root data/dpo/images \\
        --out data/shards/preference --workers 8
"""

import sys

from vargpt.data.dataset_formats import PreferenceConverter, annotation_cli

if __name__ == "__main__":
    sys.exit(annotation_cli(sys.argv[1:], __doc__, PreferenceConverter))
