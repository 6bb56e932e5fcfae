"""VARGPT's model library: VQ-VAE, VAR decoder, projectors and the unified model (no training code here).

Generation (prompt processing, the mixed-modal decoder, model loading) is the package above this one:
``vargpt.inference.generate(model, conversations, images, sampling)``. This package imports nothing from
``vargpt.data`` or ``vargpt.inference``; the token ids it shares with the data package are ``vargpt.tokens``.
"""

from vargpt.model.config import ModelConfig, load_model_config
from vargpt.model.sampling_config import SamplingConfig
from vargpt.model.scales import VAR_PATCH_NUMS, ScaleSchedule
from vargpt.model.var import VAR, build_var
from vargpt.model.vargpt import VARGPT, VARGPTOutput, build_vargpt
from vargpt.model.vqvae import VQVAE, build_vqvae
from vargpt.tokens import SpecialTokenIds

__all__ = [
    "VAR",
    "VAR_PATCH_NUMS",
    "VARGPT",
    "VQVAE",
    "ModelConfig",
    "SamplingConfig",
    "ScaleSchedule",
    "SpecialTokenIds",
    "VARGPTOutput",
    "build_var",
    "build_vargpt",
    "build_vqvae",
    "load_model_config",
]
