"""The released VARGPT_LLaVA-v1 metadata <-> ours: ``config.json``, ``generation_config.json``, processor configs.

* ``config.json`` (``model_type: vargpt_llava``, ``text_config`` = Llama, ``vision_config`` = CLIP vision,
  ``special_tokens``) <-> :class:`ModelConfig` + :class:`SpecialTokenIds`. The release hard-codes the VAR-d30
  decoder and the 256-px VQ-VAE; exports of other sizes add ``var_config`` and ``vqvae_config`` (the official
  code ignores unknown config fields, and only the 7B size fits its hard-coded modules anyway);
* ``generation_config.json`` (the same ``special_tokens`` plus ``allowed_special_tokens``),
  ``preprocessor_config.json`` (CLIPImageProcessor) and ``processor_config.json`` (VARGPTLlavaProcessor);
* the dtype names of ``torch_dtype`` and of the converters' ``--dtype``.

The folders themselves (weights, tokenizer files, key names) are :mod:`vargpt.checkpoint.released`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoConfig, CLIPVisionConfig

from vargpt.model.config import LLMConfig, ModelConfig, VARConfig, VisionConfig, VQVAEConfig
from vargpt.tokens import GEN_TOKENS, IMAGE_TOKEN, SpecialTokenIds

try:  # an internal table of transformers, which may move between versions
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
except ImportError:
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES = {"llama": "LlamaForCausalLM"}

log = logging.getLogger(__name__)

MODEL_TYPE = "vargpt_llava"
ARCHITECTURE = "VARGPTLlavaForConditionalGeneration"
PROCESSOR_CLASS = "VARGPTLlavaProcessor"
# text_config fields that change the LLM's weights or maths beyond LLMConfig's named ones: kept in llm.extra.
_LLM_EXTRA_FIELDS = ("attention_bias", "mlp_bias", "head_dim", "rope_scaling", "use_sliding_window", "sliding_window")
_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
           "fp16": torch.float16, "float16": torch.float16}  # fmt: skip


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``'bf16' | 'fp32' | 'fp16' | torch.dtype`` -> dtype; ``None`` or ``'keep'`` -> None (keep each tensor's)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype.lower() in ("keep", "none", "auto"):
        return None
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"dtype={dtype!r}: expected one of bf16, fp32, fp16, keep") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def released_config(
    cfg: ModelConfig, ids: SpecialTokenIds, dtype: torch.dtype = torch.bfloat16, base: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The ``config.json`` of a VARGPT_LLaVA folder for ``cfg`` and ``ids``.

    ``base`` (a source folder's config.json) is kept for every field this function does not own, so converting
    a released folder and back changes only ``torch_dtype`` (and adds ``var_config``/``vqvae_config``).
    """
    llm, vis = cfg.llm, cfg.vision
    text_config = {
        "_name_or_path": (base or {}).get("text_config", {}).get("_name_or_path", "lmsys/vicuna-7b-v1.5"),
        "architectures": [_causal_lm_class(llm.model_type)],
        "model_type": llm.model_type,
        "hidden_size": llm.hidden_size,
        "intermediate_size": llm.intermediate_size,
        "num_hidden_layers": llm.num_hidden_layers,
        "num_attention_heads": llm.num_attention_heads,
        "num_key_value_heads": llm.num_key_value_heads,
        "max_position_embeddings": llm.max_position_embeddings,
        "rms_norm_eps": llm.rms_norm_eps,
        "rope_theta": llm.rope_theta,
        "hidden_act": llm.hidden_act,
        "vocab_size": llm.vocab_size,
        "tie_word_embeddings": False,
        "torch_dtype": dtype_name(dtype),
        **dict(llm.extra),
    }
    if ids.bos is not None:
        text_config["bos_token_id"] = ids.bos
    text_config["eos_token_id"] = ids.eos
    vision_config = {
        "model_type": "clip_vision_model",
        "hidden_size": vis.hidden_size,
        "intermediate_size": vis.intermediate_size,
        "num_hidden_layers": vis.num_hidden_layers,
        "num_attention_heads": vis.num_attention_heads,
        "patch_size": vis.patch_size,
        "image_size": vis.image_size,
        "projection_dim": vis.projection_dim,
        "hidden_act": vis.hidden_act,
        "layer_norm_eps": vis.layer_norm_eps,
    }
    out = dict(base or {})
    out.update(
        {
            "architectures": [ARCHITECTURE],
            "model_type": MODEL_TYPE,
            "ignore_index": -100,
            "image_token_index": ids.image,
            "image_seq_length": vis.num_image_tokens,
            "pad_token_id": ids.pad,
            "projector_hidden_act": cfg.projector_hidden_act,
            "vision_feature_layer": vis.feature_layer,
            "vision_feature_select_strategy": "default",
            "hidden_size": llm.hidden_size,
            "vocab_size": llm.vocab_size,
            "tie_word_embeddings": False,
            "torch_dtype": dtype_name(dtype),
            "special_tokens": ids.to_released_config(),
            "text_config": {**(base or {}).get("text_config", {}), **text_config},
            "vision_config": {**(base or {}).get("vision_config", {}), **vision_config},
            # Not in the release (it hard-codes VAR-d30 and the 256-px VQ-VAE): read back by this package.
            "var_config": {**_plain(asdict(cfg.var)), "num_classes": ids.gen_start + 1},
            "vqvae_config": _plain(asdict(cfg.vqvae)),
        }
    )
    out.setdefault("train_from_scratch", False)
    out["transformers_version"] = _transformers_version()
    return out


def model_config_from_released(config: Mapping[str, Any] | str | Path, name: str | None = None) -> ModelConfig:
    """Our ModelConfig from a released ``config.json`` (a dict, the file, or its folder).

    Fields the file omits take the defaults of the transformers config class of their ``model_type`` (as the
    official code does: the released text_config lists only a few Llama fields), and the release's VAR-d30 /
    ``vae_ch160v4096z32`` when ``var_config``/``vqvae_config`` are absent.
    """
    config = read_config_json(config) if not isinstance(config, Mapping) else config
    if config.get("model_type") not in (MODEL_TYPE, "llava"):
        raise ValueError(f"config.json has model_type={config.get('model_type')!r}, expected {MODEL_TYPE!r} (or llava)")
    tc = dict(config.get("text_config") or {})
    llm_type = tc.pop("model_type", "llama")
    tc.pop("torch_dtype", None)
    text = AutoConfig.for_model(llm_type, **{k: v for k, v in tc.items() if not k.startswith("_")})
    rope = getattr(text, "rope_parameters", None) or {}
    rope_theta = getattr(text, "rope_theta", None) or rope.get("rope_theta", 10000.0)
    llm = LLMConfig(
        model_type=llm_type,
        hidden_size=text.hidden_size,
        num_hidden_layers=text.num_hidden_layers,
        num_attention_heads=text.num_attention_heads,
        num_key_value_heads=text.num_key_value_heads or text.num_attention_heads,
        intermediate_size=text.intermediate_size,
        vocab_size=int(config.get("vocab_size") or text.vocab_size),
        max_position_embeddings=text.max_position_embeddings,
        rms_norm_eps=text.rms_norm_eps,
        rope_theta=float(rope_theta),
        hidden_act=text.hidden_act,
        extra={k: tc[k] for k in _LLM_EXTRA_FIELDS if k in tc},
    )
    if text.vocab_size != llm.vocab_size:
        raise ValueError(f"config.json: vocab_size {llm.vocab_size} disagrees with text_config ({text.vocab_size})")
    vc = {k: v for k, v in (config.get("vision_config") or {}).items() if k != "model_type"}
    vis = CLIPVisionConfig(**vc)
    vision = VisionConfig(
        hidden_size=vis.hidden_size,
        num_hidden_layers=vis.num_hidden_layers,
        num_attention_heads=vis.num_attention_heads,
        intermediate_size=vis.intermediate_size,
        patch_size=vis.patch_size,
        image_size=vis.image_size,
        projection_dim=vis.projection_dim,
        hidden_act=vis.hidden_act,
        layer_norm_eps=vis.layer_norm_eps,
        feature_layer=int(config.get("vision_feature_layer", -2)),
    )
    strategy = config.get("vision_feature_select_strategy", "default")
    if strategy != "default":
        raise ValueError(f"vision_feature_select_strategy={strategy!r}: only 'default' (CLS dropped) is implemented")
    var = _dataclass_from(VARConfig, config.get("var_config") or {})
    vqvae = _dataclass_from(VQVAEConfig, config.get("vqvae_config") or {})
    vqvae.ch_mult, vqvae.patch_nums = tuple(vqvae.ch_mult), tuple(vqvae.patch_nums)
    cfg = ModelConfig(
        name=name or config.get("_name_or_path") or "vargpt_llava",
        llm=llm,
        vision=vision,
        vqvae=vqvae,
        var=var,
        projector_hidden_act=config.get("projector_hidden_act", "gelu"),
    )
    cfg.vqvae.validate()
    return cfg


def special_ids_from_released(config: Mapping[str, Any], tokenizer: Any = None) -> SpecialTokenIds:
    """The special ids of a released folder: from its tokenizer when given (checked against config.json's
    ``special_tokens``), else from config.json alone."""
    st = config.get("special_tokens") or {}
    if tokenizer is not None:
        ids = SpecialTokenIds.from_tokenizer(tokenizer)
        conflicts = special_ids_conflicts(config, ids)
        if conflicts:
            raise ValueError("the folder's tokenizer and config.json disagree: " + "; ".join(conflicts))
        return ids
    missing = [
        k for k in ("image_gen_start_token_id", "image_gen_end_token_id", "image_gen_pad_token_id") if k not in st
    ]
    if missing or "image_token_index" not in config or "pad_token_id" not in config:
        raise ValueError(
            f"config.json lacks special token ids {missing or ['image_token_index/pad_token_id']} and the folder "
            "has no tokenizer: cannot tell the model's special ids"
        )
    tc = config.get("text_config") or {}
    return SpecialTokenIds(
        image=int(config["image_token_index"]),
        pad=int(config["pad_token_id"]),
        gen_start=int(st["image_gen_start_token_id"]),
        gen_end=int(st["image_gen_end_token_id"]),
        gen_pad=int(st["image_gen_pad_token_id"]),
        eos=int(tc.get("eos_token_id", 2)),
        bos=int(tc.get("bos_token_id", 1)),
    )


def special_ids_conflicts(config: Mapping[str, Any], ids: SpecialTokenIds) -> list[str]:
    """Where config.json's special token ids differ from ``ids`` (empty when they agree or are absent)."""
    st = config.get("special_tokens") or {}
    pairs = [
        ("image_token_index", config.get("image_token_index"), ids.image),
        ("special_tokens.image_gen_start_token_id", st.get("image_gen_start_token_id"), ids.gen_start),
        ("special_tokens.image_gen_end_token_id", st.get("image_gen_end_token_id"), ids.gen_end),
        ("special_tokens.image_gen_pad_token_id", st.get("image_gen_pad_token_id"), ids.gen_pad),
    ]
    return [f"{name}: config.json {a} vs model {b}" for name, a, b in pairs if a is not None and int(a) != b]


def generation_config(ids: SpecialTokenIds, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``generation_config.json`` as the prepare step writes it (llava-hf's, plus the special tokens)."""
    out = dict(base or {"_from_model_config": True})
    out.update(
        {
            "bos_token_id": ids.bos,
            "eos_token_id": ids.eos,
            "pad_token_id": ids.pad,
            "special_tokens": ids.to_released_config(),
            "allowed_special_tokens": list(GEN_TOKENS),
            "transformers_version": _transformers_version(),
        }
    )
    if ids.bos is None:
        out.pop("bos_token_id")
    return out


def processor_configs(cfg: ModelConfig) -> dict[str, dict[str, Any]]:
    """``preprocessor_config.json`` (CLIPImageProcessor at the tower's size) and ``processor_config.json``."""
    s = cfg.vision.image_size
    pre = {
        "crop_size": {"height": s, "width": s},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": list(cfg.vision.image_mean),
        "image_processor_type": "CLIPImageProcessor",
        "image_std": list(cfg.vision.image_std),
        "processor_class": PROCESSOR_CLASS,
        "resample": 3,  # bicubic
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": s},
    }
    proc = {
        "image_token": IMAGE_TOKEN,
        "patch_size": cfg.vision.patch_size,
        "processor_class": PROCESSOR_CLASS,
        "vision_feature_select_strategy": "default",
    }
    return {"preprocessor_config.json": pre, "processor_config.json": proc}


def read_config_json(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    p = p / "config.json" if p.is_dir() else p
    return json.loads(p.read_text())


# ---------------------------------------------------------------------------------------------- helpers
def _dataclass_from(cls: type, values: Mapping[str, Any]) -> Any:
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names - {"num_classes"})
    if unknown:
        log.warning("config.json %s: ignoring unknown fields %s", cls.__name__, unknown)
    return cls(**{k: v for k, v in values.items() if k in names})


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _causal_lm_class(model_type: str) -> str:
    """transformers' causal-LM class name of ``model_type`` (LlamaForCausalLM for the release)."""
    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, "AutoModelForCausalLM")


def _transformers_version() -> str:
    return transformers.__version__
