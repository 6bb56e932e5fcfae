"""LightningModules of the stage-0 recipes: the parts VARGPT's stage 1 starts from, trained from scratch.

The real recipe starts from LLaVA-1.5, VAR-d30 and VAR's VQ-VAE; these modules make the same kinds of parts
(at any size) so the embedded default does too, and so a user can train a VQ-VAE or a class-conditional VAR on
their own images with the same app:

* ``VQVAERecipe``: reconstruction + VQ losses (VAR's quantiser), codebook usage logged, dead codes revived.
* ``ClassVARRecipe``: VAR's own recipe: teacher forcing over all scales, class dropout, uniform CE.
* ``ContrastiveRecipe``: CLIP's symmetric InfoNCE for an image and a text tower (transformers' CLIPModel for
  the vision tower VARGPT uses, open_clip for the CLIP-score judge).
* ``CausalLMRecipe``: next-token prediction on the conversations' text (the LLM learns the language).

They share optimisation with the VARGPT stages (vargpt.training.optim: AdamW groups, warmup + cosine).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import distributed as tdist
from torch import nn

from vargpt.eval.shapes_eval import var_judge_accuracy
from vargpt.model.var import VAR
from vargpt.model.vqvae import VQVAE
from vargpt.training.optim import build_scheduler, param_groups


def psnr_pm1(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2), per image, on the clamped reconstruction."""
    mse = (recon.clamp(-1, 1) - target).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-10))


def foreground_weights(img_B3HW: torch.Tensor, weight: float, threshold: float = 0.1) -> torch.Tensor:
    """Per-pixel loss weights (B, 1, H, W): 1, plus ``weight`` on pixels that differ from the image's background.

    The background is the per-channel median of the 2-pixel border ring (as the shapes judge estimates it); a
    pixel is foreground when its RGB distance from it exceeds ``threshold`` (images in [-1, 1]), grown by one
    pixel so anti-aliased edges count. Written here (no library does it): on objects over a plain background the
    objects are a few per cent of the pixels, and plain MSE learns the background long before their colours.
    """
    ring = [img_B3HW[..., :2, :], img_B3HW[..., -2:, :], img_B3HW[..., :, :2], img_B3HW[..., :, -2:]]
    bg_B3 = torch.cat([r.flatten(2) for r in ring], 2).median(2).values
    fg_B1HW = ((img_B3HW - bg_B3[..., None, None]).norm(dim=1, keepdim=True) > threshold).float()
    return 1.0 + weight * F.max_pool2d(fg_B1HW, 3, stride=1, padding=1)


def weighted_mse(recon: torch.Tensor, target: torch.Tensor, weight_B1HW: torch.Tensor | None) -> torch.Tensor:
    """MSE over pixels and channels, each pixel counted ``weight`` times (plain MSE without weights)."""
    if weight_B1HW is None:
        return F.mse_loss(recon.float(), target)
    return ((recon.float() - target).pow(2) * weight_B1HW).sum() / (weight_B1HW.sum() * target.shape[1])


class RecipeModule(pl.LightningModule):
    """AdamW with the project's groups and schedule, and per-epoch reseeding of the image stream."""

    def __init__(self, lr: float, weight_decay: float, warmup_ratio: float, total_steps: int, betas=(0.9, 0.95)):
        super().__init__()
        self.lr, self.weight_decay, self.warmup_ratio = lr, weight_decay, warmup_ratio
        self.total_steps, self.betas = total_steps, tuple(betas)

    def configure_optimizers(self) -> dict[str, Any]:
        groups = param_groups(self, self.lr, self.weight_decay)
        opt = torch.optim.AdamW(groups, lr=self.lr, betas=self.betas)
        sched = build_scheduler(opt, self.total_steps, self.warmup_ratio, "cosine", 0.05)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_epoch_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        stream = getattr(dm, "train_stream", None)
        if stream is not None:
            stream.set_epoch(self.current_epoch)

    def _log(self, prefix: str, values: dict[str, torch.Tensor], batch_size: int) -> None:
        on_step = prefix == "train"
        self.log_dict(
            {f"{prefix}/{k}": v.detach().float() for k, v in values.items()},
            on_step=on_step,
            on_epoch=not on_step,
            batch_size=batch_size,
            sync_dist=not on_step,
        )


class VQVAERecipe(RecipeModule):
    """Train a multi-scale VQ-VAE: MSE reconstruction + VAR's VQ loss; revive unused codes every N steps.

    Written here because VAR released no VQ-VAE training code. Three choices keep the codebook alive when
    training from scratch (with N(0, 1) rows and raw-feature revival the tiny VQ-VAE collapsed to ~9 codes and
    decoded every image to its background, 14.6 dB):

    * ``warmup_ae_steps``: the first steps train encoder and decoder as a plain autoencoder (the decoder reads
      the continuous latent), so the features carry the shapes before any code is picked; then the codebook
      is initialised from the residuals every scale quantises (SoundStream's data-driven codebook init).
    * ``codebook_init``: VAR's ``eini`` rule for the rows before that (small uniform rows by default).
    * dead codes are revived every ``revive_every`` steps from the scales' residuals, not from raw features.

    ``fg_weight > 0`` weights the reconstruction loss towards foreground pixels (:func:`foreground_weights`), a
    deviation from VAR's VQ-VAE loss for images of small objects on plain backgrounds (the shapes world): at the
    same budget it gave higher PSNR and objects of the right colour (numbers in docs/backbones.md).
    """

    def __init__(
        self,
        vqvae: VQVAE,
        revive_every: int = 10,
        codebook_init: float = -1.0,
        warmup_ae_steps: int = 0,
        revive_per_scale: int = 256,
        fg_weight: float = 0.0,
        **opt: Any,
    ) -> None:
        super().__init__(**opt)
        self.vqvae = vqvae
        self.fg_weight = fg_weight
        self.revive_every = revive_every
        self.warmup_ae_steps = warmup_ae_steps
        self.revive_per_scale = revive_per_scale
        vqvae.quantize.eini(codebook_init)

    @torch.no_grad()
    def _residual_rows(self, img: torch.Tensor, per_scale: int) -> torch.Tensor:
        return self.vqvae.quantize.residual_samples(self.vqvae.img_to_f(img), per_scale)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        img = batch["images"]
        step = self.global_step
        if self.warmup_ae_steps and step == self.warmup_ae_steps:
            self._init_codebook(img)
        weight = foreground_weights(img, self.fg_weight) if self.fg_weight > 0 else None
        if step < self.warmup_ae_steps:
            recon_img = self.vqvae.decoder(self.vqvae.post_quant_conv(self.vqvae.img_to_f(img)))
            recon = weighted_mse(recon_img, img, weight)
            self._log("train", {"loss": recon, "loss_recon": recon}, len(img))
            return recon
        out = self.vqvae(img)
        recon = weighted_mse(out.recon, img, weight)
        loss = recon + out.vq_loss
        self._log("train", {"loss": loss, "loss_recon": recon, "vq_loss": out.vq_loss, "usage": out.usage}, len(img))
        if self.revive_every and (step + 1) % self.revive_every == 0:
            revived = self.vqvae.revive_dead_codes(self._residual_rows(img, self.revive_per_scale))
            self.log("train/revived_codes", float(revived), on_step=True)
        return loss

    def _init_codebook(self, img: torch.Tensor) -> None:
        """Every row from a random residual row of this batch (all scales alike); hit counts start over.

        Under torch.distributed rank 0's codebook is broadcast: ranks see different batches.
        """
        q = self.vqvae.quantize
        rows_NC = self._residual_rows(img, -(-q.vocab_size // q.schedule.num_scales))
        pick = torch.randperm(len(rows_NC), device=rows_NC.device)[: q.vocab_size]
        q.embedding.weight.data.copy_(rows_NC[pick])
        if tdist.is_available() and tdist.is_initialized():
            tdist.broadcast(q.embedding.weight.data, src=0)
        q.ema_vocab_hit_SV.zero_()
        q.record_hit = 0

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        img = batch["images"]
        codes = self.vqvae.img_to_codes(img)
        recon = self.vqvae.codes_to_img(codes)
        used = torch.cat(codes, 1).unique().numel() / self.vqvae.V
        self._log("val", {"psnr": psnr_pm1(recon, img).mean(), "codes_used": torch.tensor(used)}, len(img))


class ClassVARRecipe(RecipeModule):
    """VAR's training recipe on a frozen VQ-VAE: teacher forcing over all scales, class dropout, uniform CE.

    ``judge_per_class > 0`` (the shapes world's classes only): each validation also samples that many images
    per class with VAR's sampling defaults and logs what the world's judge says of them (``val/judge_*``):
    teacher-forced token accuracy says little about the images it generates.
    """

    def __init__(self, var: VAR, vqvae: VQVAE, judge_per_class: int = 0, **opt: Any) -> None:
        super().__init__(**opt)
        self.var = var
        self.vqvae = vqvae.requires_grad_(False).eval()
        self.judge_per_class = judge_per_class
        var.bind_vqvae(vqvae)

    def on_validation_epoch_end(self) -> None:
        if self.judge_per_class <= 0 or self.trainer.sanity_checking:
            return
        figures = var_judge_accuracy(self.var, self.vqvae, per_class=self.judge_per_class)
        self.log_dict({f"val/judge_{k}": v for k, v in figures.items() if k != "n"}, sync_dist=True)

    def train(self, mode: bool = True) -> ClassVARRecipe:
        super().train(mode)
        self.vqvae.eval()  # a frozen tokenizer
        return self

    def _losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        codes = self.vqvae.img_to_codes(batch["images"])
        gt_BL = torch.cat(codes, 1)
        logits_BLV = self.var(batch["labels"], self.vqvae.codes_to_teacher_input(codes))
        ce_BL = F.cross_entropy(logits_BLV.transpose(1, 2), gt_BL, reduction="none")
        hit_BL = (logits_BLV.argmax(-1) == gt_BL).float()
        b, e = self.var.schedule.begin_end[-1]
        return {
            "loss": ce_BL.mean(),
            "acc": hit_BL.mean(),
            "loss_tail": ce_BL[:, b:e].mean(),
            "acc_tail": hit_BL[:, b:e].mean(),
        }

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        losses = self._losses(batch)
        self._log("train", losses, len(batch["labels"]))
        return losses["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._log("val", self._losses(batch), len(batch["labels"]))


class ContrastiveRecipe(RecipeModule):
    """CLIP's symmetric contrastive loss; ``tower`` maps (images, captions) to normalised features + scale.

    One module serves both CLIPs of the embedded default: ``HFCLIPTower`` (transformers' CLIPModel: its vision
    model becomes VARGPT's vision tower) and ``OpenCLIPTower`` (the open_clip judge of CLIP score).
    """

    def __init__(self, tower: nn.Module, **opt: Any) -> None:
        super().__init__(**opt)
        self.tower = tower

    def _losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        img_NC, txt_NC, scale = self.tower(batch["images"], batch["captions"])
        logits_NN = scale * img_NC @ txt_NC.T
        # Captions repeat in a world of few attributes: a pair's positives are all items with the same caption.
        caps = batch["captions"]
        same_NN = torch.tensor([[a == b for b in caps] for a in caps], device=logits_NN.device, dtype=torch.float)
        # same_NN is symmetric with equal row and column sums, so one target serves both directions.
        target_NN = same_NN / same_NN.sum(1, keepdim=True)
        loss = 0.5 * (F.cross_entropy(logits_NN, target_NN) + F.cross_entropy(logits_NN.T, target_NN))
        acc = (same_NN.gather(1, logits_NN.argmax(1, keepdim=True)) > 0).float().mean()
        return {"loss": loss, "acc_i2t": acc, "logit_scale": scale.detach()}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        losses = self._losses(batch)
        self._log("train", losses, len(batch["captions"]))
        return losses["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._log("val", self._losses(batch), len(batch["captions"]))


class HFCLIPTower(nn.Module):
    """transformers' CLIPModel with a project tokenizer: (images, captions) -> normalised features, scale."""

    def __init__(self, clip: nn.Module, tokenizer: Any, max_length: int) -> None:
        super().__init__()
        self.clip = clip
        self.tokenizer = tokenizer
        self.max_length = max_length

    def forward(self, images: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tok = self.tokenizer(
            captions, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(images.device)
        # CLIP's text tower pools at the eos position: make sure every caption has one.
        ids = tok["input_ids"]
        lengths = tok["attention_mask"].sum(1).clamp(max=self.max_length - 1)
        ids = ids.scatter(1, lengths[:, None], self.tokenizer.eos_token_id)
        mask = tok["attention_mask"].scatter(1, lengths[:, None], 1)
        img = self.clip.get_image_features(pixel_values=images)
        img = getattr(img, "pooler_output", img)  # transformers 5.x returns an output object
        # Pool at the eos we placed ourselves: with eos_token_id == 2 (Llama-style tokenizers, ours) transformers'
        # CLIP text tower keeps its legacy rule and pools at argmax(input_ids), i.e. at the caption's
        # highest-id word, which under the causal mask has not seen the rest of the caption.
        hidden_BTD = self.clip.text_model(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled_BD = hidden_BTD[torch.arange(len(ids), device=ids.device), lengths]
        txt = self.clip.text_projection(pooled_BD)
        return F.normalize(img, dim=-1), F.normalize(txt, dim=-1), self.clip.logit_scale.exp().clamp(max=100)


class OpenCLIPTower(nn.Module):
    """An open_clip model and its tokenizer: (images, captions) -> normalised features, scale."""

    def __init__(self, model: nn.Module, tokenizer: Any) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer

    def forward(self, images: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens = self.tokenizer(captions).to(images.device)
        img = self.model.encode_image(images, normalize=True)
        txt = self.model.encode_text(tokens, normalize=True)
        return img, txt, self.model.logit_scale.exp().clamp(max=100)


class CausalLMRecipe(RecipeModule):
    """Next-token prediction on token batches (``input_ids``, ``labels``) with a transformers causal LM."""

    def __init__(self, llm: nn.Module, **opt: Any) -> None:
        super().__init__(**opt)
        self.llm = llm

    def _losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = self.llm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        return {"loss": out.loss, "ppl": torch.exp(out.loss.detach().clamp(max=20))}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        losses = self._losses(batch)
        self._log("train", losses, len(batch["input_ids"]))
        return losses["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._log("val", self._losses(batch), len(batch["input_ids"]))
