"""Typed config of a stage-0 recipe (``stage.recipe`` in ``conf/stage/world_*.yaml``), trained by vargpt.backbones.

A leaf module: the root schema (vargpt.config) composes it without importing the backbones package.

A stage without a recipe is a VARGPT stage; with one, the same app trains a backbone instead: the VQ-VAE, the
class-conditional VAR, the CLIP vision tower, the language model, or the CLIP-score judge.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class RecipeKind(Enum):
    vqvae = "vqvae"  # reconstruction + VQ losses on the sources' images
    class_var = "class_var"  # VAR's class-conditional recipe on a frozen VQ-VAE
    vision_clip = "vision_clip"  # transformers CLIPModel; its vision model becomes VARGPT's vision tower
    text_lm = "text_lm"  # the LLM learns the sources' language (next token on the chat text)
    judge_clip = "judge_clip"  # an open_clip model: the CLIP-score judge of generated images


@dataclass
class TextTowerConfig:
    """The text tower of the vision CLIP (it uses the LLM's tokenizer; dropped after training)."""

    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    intermediate_size: int = 256
    max_length: int = 32
    projection_dim: int = 64


@dataclass
class RecipeConfig:
    kind: RecipeKind = RecipeKind.vqvae
    # Shard sources (folders under data.root) of the training and validation items.
    train_sources: list[str] = field(default_factory=list)
    val_sources: list[str] = field(default_factory=list)
    val_samples: int = 256
    # Items per micro batch and DataLoader workers.
    micro_batch_size: int = 32
    num_workers: int = 0
    # vqvae: revive dead codes every this many steps (0 = never), from the scales' residuals.
    revive_every: int = 10
    # vqvae: VAR's eini rule for the codebook (< 0: uniform +-|x|/V, > 0: trunc normal of std x, 0: N(0, 1)).
    codebook_init: float = -1.0
    # vqvae: train as a plain autoencoder for this many steps, then init the codebook from the residuals.
    warmup_ae_steps: int = 0
    # vqvae: extra reconstruction-loss weight on pixels unlike the image's border (objects on a plain background).
    fg_weight: float = 0.0
    # class_var: the VQ-VAE it learns the codes of (a stage name of this run root, or a file).
    vqvae_from: str = "world_vqvae"
    # class_var: samples per class the shapes world's judge checks at each validation (0 = none; world only).
    judge_per_class: int = 0
    # text_lm: longest token sequence.
    max_length: int = 256
    text_tower: TextTowerConfig = field(default_factory=TextTowerConfig)
    # judge_clip: open_clip architecture and the keys replacing its config (a tiny tower for the world).
    judge_arch: str = "ViT-B-32"
    judge_model_cfg: dict[str, Any] = field(default_factory=dict)
