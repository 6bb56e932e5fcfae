"""Build a stage-0 recipe from a composed config, export what it trained, and assemble VARGPT from the parts.

``build_recipe`` gives the LightningModule and the data of one ``stage.recipe``; ``export_recipe`` writes its
product as safetensors under the run's ``export/`` folder (the stage record points the next stages there);
``assemble_vargpt`` puts the exported parts into one VARGPT, the way the release's prepare step puts LLaVA-1.5,
VAR-d30 and the VQ-VAE together (the class embedding, sized by the tokenizer, starts fresh; reference 1.2).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from vargpt.backbones.recipes import (
    CausalLMRecipe,
    ClassVARRecipe,
    ContrastiveRecipe,
    HFCLIPTower,
    OpenCLIPTower,
    RecipeModule,
    VQVAERecipe,
)
from vargpt.backbones.streams import (
    NUM_SHAPES_CLASSES,
    ImageItems,
    StreamDataModule,
    TextItems,
    collate_images,
    collate_texts,
    shapes_class,
)
from vargpt.data.transforms import clip_transform, var_transform
from vargpt.model.config import ModelConfig
from vargpt.model.var import var_from_config
from vargpt.model.vargpt import VARGPT, clip_vision_config, llm_config
from vargpt.model.vqvae import vqvae_from_config
from vargpt.recipe_config import RecipeConfig, RecipeKind
from vargpt.training.checkpointing import read_stage_record

# The file each recipe leaves in its run's export/ folder.
PRODUCT_FILE = {
    RecipeKind.vqvae: "vqvae.safetensors",
    RecipeKind.class_var: "var.safetensors",
    RecipeKind.vision_clip: "vision_tower.safetensors",
    RecipeKind.text_lm: "language_model.safetensors",
    RecipeKind.judge_clip: "judge_clip.safetensors",
}


def recipe_config(recipe: DictConfig) -> RecipeConfig:
    """The typed recipe of a stage's ``stage.recipe`` section."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RecipeConfig), recipe))


def product_path(log_dir: str | Path, stage: str, kind: RecipeKind) -> Path:
    """The exported product of a finished recipe stage of this run root."""
    record = read_stage_record(log_dir, stage)
    if record.export_dir is None:
        raise FileNotFoundError(f"stage {stage} finished without an export (callbacks.checkpoint.export=none?)")
    return Path(record.export_dir) / PRODUCT_FILE[kind]


def _hf_clip(m: ModelConfig, r: RecipeConfig, tokenizer: Any) -> torch.nn.Module:
    # transformers and open_clip here, not at the top: heavy imports only the recipes that train them need.
    from transformers import CLIPConfig, CLIPModel

    t = r.text_tower
    text = dict(
        hidden_size=t.hidden_size,
        num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads,
        intermediate_size=t.intermediate_size,
        vocab_size=len(tokenizer),
        max_position_embeddings=t.max_length,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = clip_vision_config(m).to_dict()
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=t.projection_dim))


def _judge(r: RecipeConfig) -> tuple[torch.nn.Module, Any, Any]:
    import open_clip  # heavy, and only the judge recipe needs it

    model, _, preprocess = open_clip.create_model_and_transforms(
        r.judge_arch, pretrained=None, **OmegaConf.to_container(OmegaConf.create(r.judge_model_cfg))
    )
    return model, preprocess, open_clip.get_tokenizer(r.judge_arch, context_length=model.context_length)


def build_recipe(
    r: RecipeConfig,
    m: ModelConfig,
    stage: DictConfig,
    data: DictConfig,
    tokenizer: Any,
    total_steps: int,
    log_dir: str | Path,
) -> tuple[RecipeModule, StreamDataModule]:
    """The LightningModule and data of the recipe ``r`` (``stage.recipe``), model sizes from ``m`` (``model``),
    optimisation and budget from the ``stage`` section, image sources and transforms from the ``data`` section;
    products of earlier recipes are looked up under the run root ``log_dir``."""
    opt = dict(
        lr=stage.optimizer.lr,
        weight_decay=stage.optimizer.weight_decay,
        warmup_ratio=stage.scheduler.warmup_ratio,
        total_steps=total_steps,
        betas=tuple(stage.optimizer.betas),
    )
    size = m.vqvae.image_size
    # Generation targets as the VARGPT stages see them (data.gen_random_crop, data.gen_resize_ratio).
    crop, ratio = data.gen_random_crop, data.gen_resize_ratio
    var_tf = {t: var_transform(size, train=t and crop, resize_ratio=ratio) for t in (True, False)}
    vis = m.vision
    clip_tf = clip_transform(vis.image_size, tuple(vis.image_mean), tuple(vis.image_std))
    items: tuple[Any, Any]
    collate: Any = collate_images
    if r.kind == RecipeKind.vqvae:
        module: RecipeModule = VQVAERecipe(
            vqvae_from_config(m.vqvae),
            revive_every=r.revive_every,
            codebook_init=r.codebook_init,
            warmup_ae_steps=r.warmup_ae_steps,
            fg_weight=r.fg_weight,
            **opt,
        )
        items = ImageItems(var_tf[True]), ImageItems(var_tf[False])
    elif r.kind == RecipeKind.class_var:
        vqvae = vqvae_from_config(m.vqvae)
        vqvae.load_state_dict(load_file(_resolve_product(r.vqvae_from, RecipeKind.vqvae, log_dir)))
        module = ClassVARRecipe(var_from_config(m, NUM_SHAPES_CLASSES), vqvae, judge_per_class=r.judge_per_class, **opt)
        items = tuple(ImageItems(var_tf[t], label_fn=shapes_class, require_label=True) for t in (True, False))
    elif r.kind == RecipeKind.vision_clip:
        tower = HFCLIPTower(_hf_clip(m, r, tokenizer), tokenizer, r.text_tower.max_length)
        module = ContrastiveRecipe(tower, **opt)
        items = ImageItems(clip_tf), ImageItems(clip_tf)
    elif r.kind == RecipeKind.judge_clip:
        model, preprocess, tok = _judge(r)
        module = ContrastiveRecipe(OpenCLIPTower(model, tok), **opt)
        items = ImageItems(preprocess), ImageItems(preprocess)
    else:
        from transformers import AutoModelForCausalLM  # heavy, and only the language-model recipe needs it

        module = CausalLMRecipe(AutoModelForCausalLM.from_config(llm_config(m)), **opt)
        items = TextItems(tokenizer, r.max_length), TextItems(tokenizer, r.max_length)
        collate = _TextCollate(tokenizer.pad_token_id)
    datamodule = StreamDataModule(
        root=data.root,
        train_sources=list(r.train_sources),
        val_sources=list(r.val_sources),
        train_items=items[0],
        val_items=items[1],
        collate=collate,
        micro_batch_size=r.micro_batch_size,
        samples_per_epoch=stage.num_samples,
        val_samples=r.val_samples,
        num_workers=r.num_workers,
        seed=data.seed,
    )
    return module, datamodule


class _TextCollate:
    """Picklable text collate (DataLoader workers)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return collate_texts(items, self.pad_id)


def _resolve_product(source: str, kind: RecipeKind, log_dir: str | Path) -> Path:
    """A file path as is, else the export of the named stage of this run root."""
    path = Path(source)
    return path if path.is_file() else product_path(log_dir, source, kind)


def recipe_product(module: RecipeModule, kind: RecipeKind) -> dict[str, torch.Tensor]:
    """The state dict a recipe exports, in the layout VARGPT's sub-module of that part uses."""
    if kind == RecipeKind.vqvae:
        state = module.vqvae.state_dict()
    elif kind == RecipeKind.class_var:
        state = module.var.state_dict()
    elif kind == RecipeKind.vision_clip:
        state = {f"vision_model.{k}": v for k, v in module.tower.clip.vision_model.state_dict().items()}
    elif kind == RecipeKind.judge_clip:
        state = module.tower.model.state_dict()
    else:
        state = module.llm.state_dict()
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def export_recipe(module: RecipeModule, r: RecipeConfig, out_dir: Path) -> Path:
    """Write the product of recipe ``r`` (and, for the judge, how to rebuild it) to ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(recipe_product(module, r.kind), str(out_dir / PRODUCT_FILE[r.kind]))
    if r.kind == RecipeKind.judge_clip:
        spec = {"arch": r.judge_arch, "model_cfg": OmegaConf.to_container(OmegaConf.create(r.judge_model_cfg))}
        (out_dir / "judge_clip.json").write_text(json.dumps(spec, indent=2))
    return out_dir


def assemble_vargpt(model: VARGPT, log_dir: str | Path, parts: dict[str, str]) -> dict[str, str]:
    """Load the exported parts named by ``parts`` (VARGPT sub-module -> recipe stage) into ``model``.

    The class-conditional VAR's class embedding does not fit VARGPT's (sized by the tokenizer) and is skipped,
    so it keeps its fresh init: what the release's prepare step does with VAR-d30's 1001-row table.
    """
    kinds = {
        "vae_local": RecipeKind.vqvae,
        "vargpt_gen": RecipeKind.class_var,
        "vision_tower": RecipeKind.vision_clip,
        "language_model": RecipeKind.text_lm,
    }
    done = {}
    for name, stage in parts.items():
        if name not in kinds:
            raise ValueError(f"assemble: unknown part {name!r}; parts are {sorted(kinds)}")
        path = _resolve_product(stage, kinds[name], log_dir)
        state = load_file(str(path))
        target = getattr(model, name)
        own = target.state_dict()
        skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
        for k in skipped:
            state.pop(k)
        missing, unexpected = target.load_state_dict(state, strict=False)
        missing = [k for k in missing if k not in skipped]
        if missing or unexpected:
            raise ValueError(f"assemble {name} from {path}: missing {missing}, unexpected {unexpected}")
        done[name] = f"{path}" + (f" (skipped, re-initialised: {skipped})" if skipped else "")
    return done
