"""Running a VARGPT: the package above ``vargpt.model`` and ``vargpt.data`` (neither imports it).

* :mod:`~vargpt.inference.processor`: conversations to prompt ids and pixels, through ``vargpt.data.chat``;
* :mod:`~vargpt.inference.decoding`: :func:`generate`, the batched mixed-modal decoder (text and images);
* :mod:`~vargpt.inference.kv_cache`: the row and column surgery of the LLM's KV cache it needs;
* :mod:`~vargpt.inference.outputs`: what :func:`generate` returns and counts;
* :mod:`~vargpt.inference.loading`: the one :func:`load_model` of generate, eval and the notebooks;
* :mod:`~vargpt.inference.gen_codes`: data preparation that runs the VQ-VAE (precomputed generation codes).
"""

from vargpt.inference.decoding import generate
from vargpt.inference.loading import load_model
from vargpt.inference.outputs import GenerationOutput, GenerationStats

__all__ = ["GenerationOutput", "GenerationStats", "generate", "load_model"]
