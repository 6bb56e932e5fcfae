"""The released VARGPT_LLaVA-v1 folder <-> our model: key names, config.json, tokenizer and processor files.

Our ``VARGPT.state_dict()`` already uses the released key names (VARGPT-REFERENCE.md 7.1), so weights need no
renaming; :func:`released_key_names` is the one place where other spellings of the same weights are mapped onto
them (newer llava-hf saves, DDP/compile/Lightning prefixes). The rest of this module translates the folder's
metadata:

* ``config.json`` (``model_type: vargpt_llava``, ``text_config`` = Llama, ``vision_config`` = CLIP vision,
  ``special_tokens``) <-> :class:`ModelConfig` + :class:`SpecialTokenIds`. The release hard-codes the VAR-d30
  decoder and the 256-px VQ-VAE; exports of other sizes add ``var_config`` and ``vqvae_config`` (the official
  code ignores unknown config fields, and only the 7B size fits its hard-coded modules anyway);
* ``generation_config.json`` (the same ``special_tokens`` plus ``allowed_special_tokens``),
  ``preprocessor_config.json`` (CLIPImageProcessor), ``processor_config.json`` (VARGPTLlavaProcessor) and the
  tokenizer files (32005 tokens in the release);
* ``model.safetensors`` or shards + ``model.safetensors.index.json``, bf16 in the release.

An exported folder also holds ``model_config.yaml`` (our full ModelConfig, as the training app's exports do),
so that a folder we wrote rebuilds exactly; the official code ignores it.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from vargpt.checkpoint.io import DEFAULT_MAX_SHARD_BYTES, MemorySource, TensorSource, open_checkpoint, write_safetensors
from vargpt.model.config import LLMConfig, ModelConfig, VARConfig, VisionConfig, VQVAEConfig
from vargpt.model.tokens import GEN_TOKENS, IMAGE_TOKEN, SpecialTokenIds

log = logging.getLogger(__name__)

MODEL_TYPE = "vargpt_llava"
ARCHITECTURE = "VARGPTLlavaForConditionalGeneration"
PROCESSOR_CLASS = "VARGPTLlavaProcessor"
MODEL_CONFIG_FILE = "model_config.yaml"
# The released model's top-level sub-modules (the first name of every key).
TOP_MODULES = (
    "vision_tower",
    "multi_modal_projector",
    "language_model",
    "vae_local",
    "vargpt_gen",
    "image_gen_projector",
    "image_gen_projector_out",
)
LLAVA_MODULES = ("vision_tower", "multi_modal_projector", "language_model")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "chat_template.json",
    "chat_template.jinja",
)
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
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


# ---------------------------------------------------------------------------------------------- key names
_NEW_LLAVA = (
    "llava-hf layout of transformers>=4.52 (model.language_model.*, model.vision_tower.*, "
    "model.multi_modal_projector.*, lm_head.*) -> released names"
)


def released_key_names(keys: Iterable[str]) -> tuple[dict[str, str], str | None]:
    """The one key adapter: ``{released name: checkpoint name}`` for a checkpoint of (part of) VARGPT/LLaVA,
    and a description of what was renamed (None when the names already are the released ones).

    Handled spellings:

    * wrapper prefixes shared by every key (``module.`` of DDP, ``_orig_mod.`` of torch.compile, the attribute
      of a LightningModule such as ``model.``);
    * the llava-hf layout of transformers >= 4.52 (``LlavaForConditionalGeneration`` holding a ``LlavaModel``):
      ``model.language_model.X`` -> ``language_model.model.X``, ``model.vision_tower.X`` -> ``vision_tower.X``,
      ``model.multi_modal_projector.X`` -> ``multi_modal_projector.X``, ``lm_head.X`` -> ``language_model.lm_head.X``
      (older llava-hf files and the VARGPT release use the right-hand names).
    """
    keys = list(keys)
    out: dict[str, str] = {}
    changes: dict[str, None] = {}
    for key in keys:
        name = key
        for wrapper in ("module.", "_orig_mod."):
            while name.startswith(wrapper):
                name = name[len(wrapper) :]
                changes[f"wrapper prefix '{wrapper}' removed"] = None
        head = name.split(".", 1)[0]
        if head not in (*TOP_MODULES, "model", "lm_head") and all(k.startswith(head + ".") for k in keys):
            name = name[len(head) + 1 :]
            changes[f"wrapper prefix '{head}.' removed"] = None
        if name.startswith("model.") and name.split(".", 2)[1] in TOP_MODULES:
            inner = name[len("model.") :]
            if inner.startswith("language_model.") and not inner.startswith(
                ("language_model.model.", "language_model.lm_head.")
            ):
                name = "language_model.model." + inner[len("language_model.") :]
                changes[_NEW_LLAVA] = None
            else:
                name = inner
                changes["prefix 'model.' removed"] = None  # merged into _NEW_LLAVA below when both occur
        elif name.startswith("lm_head."):
            name = "language_model." + name
            changes[_NEW_LLAVA] = None
        elif name.startswith("language_model.") and not name.startswith(
            ("language_model.model.", "language_model.lm_head.")
        ):
            name = "language_model.model." + name[len("language_model.") :]
            changes["LlavaModel layout (language_model.layers.*) -> released"] = None
        if name in out:
            raise ValueError(f"checkpoint keys {out[name]!r} and {key!r} both map to {name!r}")
        out[name] = key
    if _NEW_LLAVA in changes:
        changes.pop("prefix 'model.' removed", None)
    return out, ("; ".join(changes) or None)


def as_released(source: TensorSource) -> tuple[TensorSource, str | None]:
    """``source`` viewed under the released key names (see :func:`released_key_names`)."""
    from vargpt.checkpoint.io import RenamedSource

    names, how = released_key_names(source)
    if how is None:
        return source, None
    return RenamedSource(source, names), how


# ---------------------------------------------------------------------------------------------- config.json
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
    from transformers import AutoConfig, CLIPVisionConfig

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


# ---------------------------------------------------------------------------------------------- folders
def is_released_folder(path: str | Path) -> bool:
    """A folder with a VARGPT config.json, or one of our exports (``model_config.yaml`` + weights)."""
    p = Path(path)
    if not p.is_dir():
        return False
    if (p / MODEL_CONFIG_FILE).is_file():
        return True
    cfg = p / "config.json"
    return cfg.is_file() and read_config_json(cfg).get("model_type") == MODEL_TYPE


def read_config_json(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    p = p / "config.json" if p.is_dir() else p
    return json.loads(p.read_text())


def folder_tokenizer(folder: str | Path) -> Any:
    """The tokenizer saved in ``folder`` (or its ``tokenizer/`` sub-folder), or None when there is none.

    Loaded with ``local_files_only=True`` and ``trust_remote_code=False``: a tokenizer that needs custom code is
    refused, never run.
    """
    from transformers import AutoTokenizer

    for d in (Path(folder), Path(folder) / "tokenizer"):
        if (
            (d / "tokenizer.json").is_file()
            or (d / "tokenizer_config.json").is_file()
            or (d / "tokenizer.model").is_file()
        ):
            return AutoTokenizer.from_pretrained(str(d), local_files_only=True, trust_remote_code=False)
    return None


def folder_tokenizer_or_none(folder: str | Path) -> Any:
    """:func:`folder_tokenizer`, but a tokenizer that cannot be read (e.g. a sentencepiece-only one without the
    sentencepiece package) is a warning and None: the special ids then come from config.json."""
    try:
        return folder_tokenizer(folder)
    except (OSError, ValueError, ImportError, TypeError) as err:
        log.warning("%s: tokenizer not readable (%s: %s); using config.json's ids", folder, type(err).__name__, err)
        return None


def folder_model_config(folder: str | Path) -> ModelConfig:
    """Our ModelConfig of a folder: its ``model_config.yaml`` when we wrote it, else from its config.json."""
    from vargpt.model.config import load_model_config

    folder = Path(folder)
    if (folder / MODEL_CONFIG_FILE).is_file():
        cfg = load_model_config(folder / MODEL_CONFIG_FILE)
        cfg.tokenizer, cfg.init_from = None, None
        return cfg
    cfg = model_config_from_released(read_config_json(folder), name=folder.name)
    pre = folder / "preprocessor_config.json"
    if pre.is_file():  # the image normalisation lives in the processor config, not in config.json
        values = json.loads(pre.read_text())
        if "image_mean" in values and "image_std" in values:
            cfg.vision.image_mean = tuple(float(x) for x in values["image_mean"])
            cfg.vision.image_std = tuple(float(x) for x in values["image_std"])
    return cfg


def folder_special_ids(folder: str | Path, tokenizer: Any = None) -> SpecialTokenIds:
    folder = Path(folder)
    config = read_config_json(folder) if (folder / "config.json").is_file() else {}
    tokenizer = tokenizer if tokenizer is not None else folder_tokenizer_or_none(folder)
    if tokenizer is None and not config:
        raise ValueError(f"{folder}: neither a tokenizer nor a config.json to read the special token ids from")
    return special_ids_from_released(config, tokenizer)


def write_released_folder(
    out_dir: str | Path,
    source: TensorSource,
    cfg: ModelConfig,
    ids: SpecialTokenIds,
    dtype: torch.dtype | None = torch.bfloat16,
    tokenizer: Any = None,
    copy_from: str | Path | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write a VARGPT_LLaVA folder: weights (``dtype``; None keeps each tensor's), config.json,
    generation_config.json, tokenizer, processor configs and our ``model_config.yaml``.

    ``copy_from`` (the folder converted from) provides the tokenizer and processor files verbatim and the
    fields of config.json / generation_config.json this package does not own; otherwise they are generated
    (the tokenizer from ``tokenizer``; without one the folder has no tokenizer files, and a warning says so).
    """
    from omegaconf import OmegaConf

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    src_dir = Path(copy_from) if copy_from is not None else None
    if src_dir is not None and src_dir.resolve() == out.resolve():
        raise ValueError(f"refusing to convert {src_dir} onto itself; choose another --out")
    write_safetensors(source, out, dtype=dtype, max_shard_size=max_shard_size)
    stored = dtype or _dominant_dtype(source)

    base_cfg = read_config_json(src_dir) if src_dir is not None and (src_dir / "config.json").is_file() else None
    _write_json(out / "config.json", released_config(cfg, ids, stored, base=base_cfg))
    base_gen = None
    if src_dir is not None and (src_dir / "generation_config.json").is_file():
        base_gen = json.loads((src_dir / "generation_config.json").read_text())
    _write_json(out / "generation_config.json", generation_config(ids, base=base_gen))

    copied_tok = False
    if src_dir is not None:
        for d in (src_dir, src_dir / "tokenizer"):
            names = [n for n in TOKENIZER_FILES if (d / n).is_file()]
            for n in names:
                shutil.copyfile(d / n, out / n)
            if names:
                copied_tok = True
                break
    if not copied_tok:
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out))
        else:
            log.warning("%s: no tokenizer given; the folder has no tokenizer files (pass tokenizer=...)", out)
    generated = processor_configs(cfg)
    for name in PROCESSOR_FILES:
        if src_dir is not None and (src_dir / name).is_file():
            shutil.copyfile(src_dir / name, out / name)
        else:
            _write_json(out / name, generated[name])
    cfg_out = ModelConfig(**{f.name: getattr(cfg, f.name) for f in fields(ModelConfig)})
    cfg_out.tokenizer = cfg_out.init_from = str(out.resolve())
    (out / MODEL_CONFIG_FILE).write_text(
        "# Our ModelConfig of this folder (the official code ignores this file). Load it with\n"
        "# vargpt.model.load_model_config; tokenizer and init_from point at this folder.\n"
        + OmegaConf.to_yaml(OmegaConf.structured(cfg_out))
    )
    return out


def export_released(
    model: Any,
    out_dir: str | Path,
    dtype: str | torch.dtype = "bf16",
    tokenizer: Any = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write ``model`` (a VARGPT of any size or stage) as a VARGPT_LLaVA-v1 folder that the official code and
    :func:`vargpt.checkpoint.load_weights` read back; ``dtype`` 'bf16' as the release, or 'fp32' (lossless).

    The tokenizer is ``tokenizer``, else the model's own (``model.tokenizer``). Call on the full (unsharded)
    model; under FSDP gather a full state dict first and use :func:`write_released_folder`.
    """
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    return write_released_folder(
        out_dir,
        MemorySource(state, label=f"{type(model).__name__} state_dict"),
        model.cfg,
        model.ids,
        dtype=parse_dtype(dtype),
        tokenizer=tokenizer,
        max_shard_size=max_shard_size,
    )


# ---------------------------------------------------------------------------------------------- helpers
def _dataclass_from(cls: type, values: Mapping[str, Any]) -> Any:
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names - {"num_classes"})
    if unknown:
        log.warning("config.json %s: ignoring unknown fields %s", cls.__name__, unknown)
    return cls(**{k: v for k, v in values.items() if k in names})


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _dominant_dtype(source: TensorSource) -> torch.dtype:
    counts: dict[torch.dtype, int] = {}
    for k in source:
        dt = source.dtype(k)
        if dt.is_floating_point:
            counts[dt] = counts.get(dt, 0) + source.numel(k)
    return max(counts, key=counts.get) if counts else torch.float32


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _causal_lm_class(model_type: str) -> str:
    """transformers' causal-LM class name of ``model_type`` (LlamaForCausalLM for the release)."""
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, "AutoModelForCausalLM")
    except ImportError:
        return "LlamaForCausalLM" if model_type == "llama" else "AutoModelForCausalLM"


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def open_released_weights(folder: str | Path) -> tuple[TensorSource, str | None]:
    """The weights of a released (or llava-hf, or our exported) folder under the released key names."""
    return as_released(open_checkpoint(folder))
