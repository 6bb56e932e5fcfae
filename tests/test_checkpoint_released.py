"""The released VARGPT_LLaVA-v1 folder layout: tiny models written with the released key names and files load
back tensor for tensor; fp32 round trips are bit-exact, bf16 ones give the bf16-rounded values; mismatches are
reported by name; the 7B config.json and the released key list map onto our 7B model."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vargpt.checkpoint import (
    CheckpointMismatchError,
    LoadReport,
    build_from_folder,
    export_released,
    load_weights,
    model_config_from_released,
    read_state_dict,
    released_config,
    released_key_names,
)
from vargpt.checkpoint.io import TensorSource
from vargpt.checkpoint.match import DEFAULT_RULES, Target, plan_load
from vargpt.model import SpecialTokenIds, build_vargpt, load_model_config

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
RELEASED_IDS = SpecialTokenIds(image=32000, pad=32001, gen_start=32002, gen_end=32003, gen_pad=32004, eos=2, bos=1)
WORLD_TEXT = ["a red circle above a blue square", "draw a green triangle left of a small star"] * 4


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from vargpt.data.tokenizer import train_world_tokenizer

    return train_world_tokenizer(WORLD_TEXT, tmp_path_factory.mktemp("tok"), vocab_size=200)


@pytest.fixture(scope="module")
def cfg():
    return load_model_config(CONF / "tiny.yaml")


@pytest.fixture(scope="module")
def model(cfg, tokenizer):
    torch.manual_seed(0)
    m = build_vargpt(cfg, tokenizer)
    with torch.no_grad():  # make the buffers and ln_q non-default so that copying them is visible
        m.vae_local.quantize.ema_vocab_hit_SV.uniform_()
        m.image_gen_projector.ln_q.weight.normal_()
    return m


def fresh(cfg, tokenizer, seed: int = 1):
    torch.manual_seed(seed)
    return build_vargpt(cfg, tokenizer)


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------------------------- export / load
def test_export_fp32_folder_and_bit_exact_round_trip(model, cfg, tokenizer, tmp_path):
    out = export_released(model, tmp_path / "rel", dtype="fp32", tokenizer=tokenizer, max_shard_size="4MB")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json"} <= names
    assert {"model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "model_config.yaml"} <= names
    assert sum(n.startswith("model-") for n in names) > 1

    conf = json.loads((out / "config.json").read_text())
    ids = model.ids
    assert conf["model_type"] == "vargpt_llava" and conf["architectures"] == ["VARGPTLlavaForConditionalGeneration"]
    assert conf["special_tokens"] == ids.to_released_config()
    assert (conf["image_token_index"], conf["pad_token_id"], conf["torch_dtype"]) == (ids.image, ids.pad, "float32")
    assert conf["text_config"]["hidden_size"] == cfg.llm.hidden_size and conf["vocab_size"] == cfg.llm.vocab_size
    assert conf["var_config"]["num_classes"] == ids.gen_start + 1
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["special_tokens"] == ids.to_released_config()
    assert gen["allowed_special_tokens"] == ["<|image_gen_start|>", "<|image_gen_end|>", "<|image_gen_pad|>"]
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert pre["crop_size"] == {"height": cfg.vision.image_size, "width": cfg.vision.image_size}

    # The raw file holds exactly our state dict under the released names, bit for bit.
    assert_same_tensors(read_state_dict(out), model.state_dict())

    other = fresh(cfg, tokenizer)
    report = load_weights(other, out)
    assert report.ok and not (report.missing or report.unexpected or report.reshaped or report.initialised)
    assert report.num_loaded_params == sum(p.numel() for p in model.parameters())
    assert_same_tensors(other.state_dict(), model.state_dict())

    rebuilt, report = build_from_folder(out)
    assert rebuilt.ids == model.ids and report.ok
    assert asdict(rebuilt.cfg.llm) == asdict(cfg.llm) and rebuilt.cfg.vqvae.patch_nums == cfg.vqvae.patch_nums
    assert_same_tensors(rebuilt.state_dict(), model.state_dict())


def test_bf16_export_round_trips_to_bf16_rounded_values(model, cfg, tokenizer, tmp_path):
    out = export_released(model, tmp_path / "bf16", dtype="bf16", tokenizer=tokenizer)
    stored = read_state_dict(out)
    assert stored["vargpt_gen.lvl_1L"].dtype == torch.int64
    assert all(v.dtype == torch.bfloat16 for k, v in stored.items() if k != "vargpt_gen.lvl_1L")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"

    other = fresh(cfg, tokenizer)
    report = load_weights(other, out)
    assert report.casts[(torch.bfloat16, torch.float32)] == len(stored) - 1
    expected = {k: v.to(torch.bfloat16).to(v.dtype) for k, v in model.state_dict().items()}
    assert_same_tensors(other.state_dict(), expected)
    assert torch.isinf(other.vargpt_gen.attn_bias_for_masking).any()
    # Exporting the loaded model in bf16 again writes the same bytes.
    again = export_released(other, tmp_path / "bf16_again", dtype="bf16", tokenizer=tokenizer)
    assert_same_tensors(read_state_dict(again), stored)


def _write_release_style_folder(folder: Path, state: dict[str, torch.Tensor], conf: dict, tokenizer) -> None:
    """A folder written the way the release's prepare step writes one (our writer is not used)."""
    folder.mkdir(parents=True)
    keys = sorted(state)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    for name, ks in shards.items():
        save_file({k: state[k].contiguous() for k in ks}, str(folder / name), metadata={"format": "pt"})
    weight_map = {k: name for name, ks in shards.items() for k in ks}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(conf))
    tokenizer.save_pretrained(str(folder))


def _release_style_config(cfg, ids) -> dict:
    """config.json as VARGPTLlavaConfig.save_pretrained writes it for these sizes (plus var/vqvae sizes, which the
    release hard-codes for the 7B model)."""
    return {
        "architectures": ["VARGPTLlavaForConditionalGeneration"],
        "model_type": "vargpt_llava",
        "ignore_index": -100,
        "image_token_index": ids.image,
        "pad_token_id": ids.pad,
        "padding_side": "right",
        "projector_hidden_act": "gelu",
        "special_tokens": ids.to_released_config(),
        "text_config": {
            "_name_or_path": "lmsys/vicuna-7b-v1.5",
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": cfg.llm.hidden_size,
            "intermediate_size": cfg.llm.intermediate_size,
            "num_hidden_layers": cfg.llm.num_hidden_layers,
            "num_attention_heads": cfg.llm.num_attention_heads,
            "max_position_embeddings": cfg.llm.max_position_embeddings,
            "rms_norm_eps": cfg.llm.rms_norm_eps,
            "torch_dtype": "bfloat16",
            "vocab_size": cfg.llm.vocab_size,
        },
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "train_from_scratch": False,
        "transformers_version": "4.46.1",
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": cfg.vision.hidden_size,
            "image_size": cfg.vision.image_size,
            "intermediate_size": cfg.vision.intermediate_size,
            "num_attention_heads": cfg.vision.num_attention_heads,
            "num_hidden_layers": cfg.vision.num_hidden_layers,
            "patch_size": cfg.vision.patch_size,
            "projection_dim": cfg.vision.projection_dim,
            "vocab_size": 32000,
        },
        "hidden_size": cfg.llm.hidden_size,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "vocab_size": cfg.llm.vocab_size,
        "var_config": asdict(cfg.var),
        "vqvae_config": {k: list(v) if isinstance(v, tuple | list) else v for k, v in asdict(cfg.vqvae).items()},
    }


@pytest.mark.parametrize("layout", ["released", "llava-hf>=4.52", "lightning"])
def test_release_style_folder_loads_every_tensor(model, cfg, tokenizer, tmp_path, layout):
    state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    renamed = dict(state)
    if layout == "llava-hf>=4.52":  # the same weights under newer transformers' LLaVA names
        renamed = {}
        for k, v in state.items():
            if k.startswith("language_model.model."):
                k = "model.language_model." + k.removeprefix("language_model.model.")
            elif k.startswith("language_model.lm_head."):
                k = k.removeprefix("language_model.")
            elif k.startswith(("vision_tower.", "multi_modal_projector.")):
                k = "model." + k
            renamed[k] = v
    elif layout == "lightning":
        renamed = {"model." + k: v for k, v in state.items()}
    folder = tmp_path / "VARGPT_LLaVA-v1"
    _write_release_style_folder(folder, renamed, _release_style_config(cfg, model.ids), tokenizer)

    rebuilt, report = build_from_folder(folder)
    assert report.ok and len(report.loaded) == len(state)
    if layout == "released":
        assert report.key_mapping is None
    else:
        assert report.key_mapping and ("4.52" in report.key_mapping or "'model.'" in report.key_mapping)
    assert_same_tensors(
        rebuilt.state_dict(), {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state.items()}
    )
    assert rebuilt.ids == model.ids
    assert asdict(rebuilt.cfg.llm) == asdict(cfg.llm) and asdict(rebuilt.cfg.var) == asdict(cfg.var)


# ---------------------------------------------------------------------------------------------- mismatches
def test_missing_extra_and_wrong_shape_keys_are_named(model, cfg, tokenizer, tmp_path):
    state = dict(model.state_dict())
    missing_key = "language_model.model.layers.1.mlp.up_proj.weight"
    wrong_key = "multi_modal_projector.linear_1.weight"
    extra_key = "vargpt_gen.blocks.0.attn.extra_bias"
    del state[missing_key]
    state[wrong_key] = torch.zeros(7, 3)
    state[extra_key] = torch.zeros(5)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "bad.safetensors"))

    other = fresh(cfg, tokenizer)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as err:
        load_weights(other, tmp_path / "bad.safetensors")
    msg = str(err.value)
    assert missing_key in msg and extra_key in msg and wrong_key in msg and "[7, 3]" in msg
    assert err.value.report.missing == [missing_key] and err.value.report.unexpected == [extra_key]
    assert_same_tensors(other.state_dict(), before)  # a strict failure touches nothing

    report = load_weights(other, tmp_path / "bad.safetensors", strict=False)
    assert isinstance(report, LoadReport) and not report.ok
    assert report.missing == [missing_key] and report.unexpected == [extra_key]
    assert report.reshaped == {wrong_key: ((7, 3), tuple(model.state_dict()[wrong_key].shape))}
    text = report.format()
    for key in (missing_key, extra_key, wrong_key):
        assert key in text
    sd = other.state_dict()
    assert torch.equal(sd[missing_key], before[missing_key]) and torch.equal(sd[wrong_key], before[wrong_key])
    loaded = set(model.state_dict()) - {missing_key, wrong_key}
    assert all(torch.equal(sd[k], model.state_dict()[k]) for k in loaded)
    assert report.count(report.loaded)[1] == sum(
        p.numel() for n, p in model.named_parameters() if n not in (missing_key, wrong_key)
    )


def test_accepted_absences_are_reported_as_initialised(model, cfg, tokenizer):
    """Deterministic buffers and the unused ln_q may be absent (other tools drop them); nothing else."""
    state = {k: v for k, v in model.state_dict().items() if "zero_k_bias" not in k and "lvl_1L" not in k}
    state = {k: v for k, v in state.items() if "ln_q" not in k and "attn_bias_for_masking" not in k}
    state["language_model.model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    other = fresh(cfg, tokenizer)
    report = load_weights(other, state)
    assert report.ok and not report.missing and not report.unexpected
    assert "vargpt_gen.lvl_1L" in report.initialised and "image_gen_projector.ln_q.weight" in report.initialised
    assert list(report.ignored) == ["language_model.model.layers.0.self_attn.rotary_emb.inv_freq"]


def test_special_token_ids_must_agree_with_config_json(model, cfg, tokenizer, tmp_path):
    out = export_released(model, tmp_path / "rel", dtype="fp32", tokenizer=tokenizer)
    conf = json.loads((out / "config.json").read_text())
    conf["special_tokens"]["image_gen_end_token_id"] += 1
    (out / "config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointMismatchError, match="image_gen_end_token_id"):
        load_weights(fresh(cfg, tokenizer), out)


def test_meta_device_build_assigns_the_checkpoint(model, tokenizer, tmp_path):
    out = export_released(model, tmp_path / "rel", dtype="fp32", tokenizer=tokenizer)
    rebuilt, report = build_from_folder(out, device="meta")
    assert report.ok
    assert not any(t.is_meta for t in rebuilt.state_dict().values())
    assert not any(t.is_meta for t in rebuilt.buffers())  # rotary inv_freq, CLIP position_ids recomputed
    assert_same_tensors(rebuilt.state_dict(), model.state_dict())
    ids = torch.arange(10, 30)[None]
    pixels = torch.randn(1, 3, model.cfg.vision.image_size, model.cfg.vision.image_size)
    with torch.no_grad():
        assert torch.equal(rebuilt.language_model(ids).logits, model.language_model(ids).logits)
        assert torch.equal(rebuilt.eval().image_features(pixels), model.eval().image_features(pixels))


# ---------------------------------------------------------------------------------------------- the 7B release
class ReferenceSource(TensorSource):
    """The released key list as a checkpoint without data (meta tensors): shapes and dtypes only."""

    def __init__(self, layout: dict[str, tuple[tuple[int, ...], str]], rename=lambda k: k) -> None:
        self._layout = {rename(k): (shape, getattr(torch, dt)) for k, (shape, dt) in layout.items()}
        self.label = "reference list"

    def __getitem__(self, key):
        shape, dtype = self._layout[key]
        return torch.empty(shape, dtype=dtype, device="meta")

    def __iter__(self):
        return iter(self._layout)

    def __len__(self):
        return len(self._layout)

    def shape(self, key):
        return self._layout[key][0]

    def dtype(self, key):
        return self._layout[key][1]


def _release_7b_config() -> dict:
    """The release's config.json: the prepare step's dict (VARGPT-REFERENCE.md 1.2) plus special_tokens."""
    return {
        "architectures": ["VARGPTLlavaForConditionalGeneration"],
        "ignore_index": -100,
        "image_token_index": 32000,
        "model_type": "vargpt_llava",
        "pad_token_id": 32001,
        "projector_hidden_act": "gelu",
        "special_tokens": RELEASED_IDS.to_released_config(),
        "text_config": {
            "_name_or_path": "lmsys/vicuna-7b-v1.5",
            "architectures": ["LlamaForCausalLM"],
            "max_position_embeddings": 4096,
            "model_type": "llama",
            "rms_norm_eps": 1e-05,
            "torch_dtype": "float16",
            "vocab_size": 32064,
        },
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "vision_config": {
            "hidden_size": 1024,
            "image_size": 336,
            "intermediate_size": 4096,
            "model_type": "clip_vision_model",
            "num_attention_heads": 16,
            "num_hidden_layers": 24,
            "patch_size": 14,
            "projection_dim": 768,
            "vocab_size": 32000,
        },
        "hidden_size": 4096,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "vocab_size": 32064,
    }


def test_release_config_json_builds_the_7b_model_and_its_key_list_loads_strictly(reference_lists):
    ref = reference_lists("vargpt_llava_v1")
    cfg = model_config_from_released(_release_7b_config())
    yaml = load_model_config(CONF / "vargpt_llava_7b.yaml")
    assert asdict(cfg.llm) == asdict(yaml.llm)
    assert {k: v for k, v in asdict(cfg.vision).items() if "image_" not in k} == {
        k: v for k, v in asdict(yaml.vision).items() if "image_" not in k
    }
    assert tuple(cfg.vqvae.patch_nums) == tuple(yaml.vqvae.patch_nums) and cfg.vqvae.ch == yaml.vqvae.ch
    with torch.device("meta"):
        model = build_vargpt(cfg, RELEASED_IDS)
    report = plan_load(Target.of(model), ReferenceSource(ref), DEFAULT_RULES)
    assert report.ok and len(report.loaded) == len(ref) == 1424
    assert report.num_loaded_params == 9_278_137_863

    # Our config.json of the 7B model says what the release's says.
    ours = released_config(yaml, RELEASED_IDS)
    for key in ("image_token_index", "pad_token_id", "vocab_size", "hidden_size", "special_tokens", "model_type"):
        assert ours[key] == _release_7b_config()[key], key
    assert ours["text_config"]["vocab_size"] == 32064 and ours["vision_config"]["image_size"] == 336


def test_newer_llava_names_map_onto_the_released_list(reference_lists):
    ref = reference_lists("vargpt_llava_v1")

    def newer(k: str) -> str:
        if k.startswith("language_model.model."):
            return "model.language_model." + k.removeprefix("language_model.model.")
        if k.startswith("language_model.lm_head."):
            return k.removeprefix("language_model.")
        if k.startswith(("vision_tower.", "multi_modal_projector.")):
            return "model." + k
        return k

    names, how = released_key_names(newer(k) for k in ref)
    assert set(names) == set(ref) and "4.52" in how
    names, how = released_key_names(ref)
    assert how is None and all(a == b for a, b in names.items())
    names, how = released_key_names("module." + k for k in ref)
    assert set(names) == set(ref) and "module." in how
