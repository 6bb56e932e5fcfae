"""The speed switches of ``vargpt.inference.generate``, one record for the whole mixed-modal decoder.

Every fast path is on by default except those that change numbers: the defaults give the same greedy text and
image codes as the plain path in fp32 and images within fp32 rounding of it (tests/test_fast_decode.py);
``FastPaths.plain()`` turns every one off (the reference of tests and ``bench/fast_paths.py``).

* ``vq_decode``: the VQ-VAE decoder's (:class:`vargpt.model.vqvae.DecodeOptions`: channels-last, upsample convs
  by output phase; bf16 and compile off);
* ``scale_step``: the shared VAR scale step's (:class:`vargpt.model.scale_step.ScaleStepOptions`);
* ``llm_mask_4d``: the LLM continuations get their (rows, 1, q, T) boolean attention mask built here in two
  tensor ops instead of by transformers' mask functions from the 2D mask (same mask; SDPA attention only,
  other attention implementations get the 2D mask as before).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from vargpt.model.sampling_config import SamplingConfig
from vargpt.model.scale_step import ScaleStepOptions
from vargpt.model.vqvae import DecodeOptions


@dataclass(frozen=True)
class FastPaths:
    """Which fast paths ``generate`` takes (see the module docstring)."""

    vq_decode: DecodeOptions = field(default_factory=DecodeOptions)
    scale_step: ScaleStepOptions = field(default_factory=ScaleStepOptions)
    llm_mask_4d: bool = True

    @classmethod
    def of(cls, sampling: SamplingConfig) -> FastPaths:
        """The switches a sampling config asks for (``conf/sampling``: ``var_*``, ``vq_*``, ``llm_mask_4d``)."""
        vq = DecodeOptions() if sampling.vq_fast else DecodeOptions.plain()
        return cls(
            vq_decode=dataclasses.replace(vq, bf16=sampling.vq_bf16),
            scale_step=sampling.scale_step_options(),
            llm_mask_4d=sampling.llm_mask_4d,
        )

    @classmethod
    def plain(cls) -> FastPaths:
        """Every fast path off: the decoder as it was before them."""
        return cls(vq_decode=DecodeOptions.plain(), scale_step=ScaleStepOptions.plain(), llm_mask_4d=False)
