"""VARGPT's model library: VQ-VAE, VAR decoder, projectors and the unified model (no training code here).

Generation is ``VARGPT.generate`` (vargpt.model.generation, imported lazily: it uses the data package's chat
template, which itself imports this package).
"""

from vargpt.model.config import ModelConfig, load_model_config
from vargpt.model.sampling_config import SamplingConfig
from vargpt.model.scales import VAR_PATCH_NUMS, ScaleSchedule
from vargpt.model.tokens import SpecialTokenIds
from vargpt.model.var import VAR, build_var
from vargpt.model.vargpt import VARGPT, VARGPTOutput, build_vargpt
from vargpt.model.vqvae import VQVAE, build_vqvae

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
