"""The model families SingLoRA adapts, and what differs between them: one table, no branches.

    family   denoiser (component)                  text encoders adapted      objective
    sd       UNet2DConditionModel (unet)           CLIP-L (or OpenCLIP-H)     DDPM: ε or v
    sdxl     UNet2DConditionModel, text_time       CLIP-L, OpenCLIP-bigG      DDPM: ε or v
    sd3      SD3Transformer2DModel (transformer)   CLIP-L, OpenCLIP-bigG      flow matching
    flux     FluxTransformer2DModel (transformer)  CLIP-L                     flow matching

T5 (SD3's text_encoder_3, Flux's text_encoder_2) is never adapted: it is frozen in every
public trainer (diffusers' train_dreambooth_lora_sd3.py / _flux.py adapt the CLIP encoders
only), and at 4.7 B parameters it is the part users cache, not train.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .errors import BadInput


@dataclass(frozen=True)
class Family:
    arch: str                 # base_arch in SingLoRA files
    denoiser: str             # the pipeline component that denoises
    pipeline: str             # the diffusers pipeline class
    objective: str            # "ddpm" (ε / v prediction) or "flow" (rectified flow, target noise − x0)
    base_model_version: str   # kohya's ss_base_model_version (SD1.x: sd_v1, or sd_v2 by context width)
    t5: str | None = None     # the component holding T5 (frozen, never adapted)


FAMILIES = {f.arch: f for f in (
    Family("sd", "unet", "StableDiffusionPipeline", "ddpm", "sd_v1"),
    Family("sdxl", "unet", "StableDiffusionXLPipeline", "ddpm", "sdxl_base_v1-0"),
    # kohya's sd3 / flux branches write sd3_m and flux1 (library/sai_model_spec.py)
    Family("sd3", "transformer", "StableDiffusion3Pipeline", "flow", "sd3_m", "text_encoder_3"),
    Family("flux", "transformer", "FluxPipeline", "flow", "flux1", "text_encoder_2"),
)}
DENOISERS = ("unet", "transformer")
# the denoiser classes of the transformer families (a UNet is sd or sdxl by its config)
TRANSFORMER_FAMILY = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}
# text-encoder configs' model_type that carry adapters (transformers' CLIP text towers)
ADAPTABLE_TEXT_ENCODERS = ("clip_text_model",)


def family_of(denoiser: nn.Module) -> Family:
    """The family of a UNet or transformer, from the model itself.

    SDXL's UNet (base and refiner) takes the pooled-text + size/crop "text_time" embedding.
    """
    name = type(denoiser).__name__
    if name in TRANSFORMER_FAMILY:
        return FAMILIES[TRANSFORMER_FAMILY[name]]
    if name == "UNet2DConditionModel":
        return FAMILIES["sdxl" if getattr(denoiser.config, "addition_embed_type", None) == "text_time" else "sd"]
    raise BadInput(f"{name} is not a denoiser SingLoRA supports: UNet2DConditionModel (SD1.x/2.x, SDXL), "
                   f"SD3Transformer2DModel (SD3/3.5) or FluxTransformer2DModel (Flux.1)")


def denoiser_name(components: dict) -> str | None:
    """Which component of `components` denoises ("unet" / "transformer"), None if neither is there."""
    return next((c for c in DENOISERS if c in components), None)


def base_arch(denoiser: nn.Module) -> str:
    """"sd", "sdxl", "sd3" or "flux" (an adapter may live on the denoiser alone)."""
    return family_of(denoiser).arch


def base_model_version(denoiser: nn.Module) -> str:
    """kohya's ss_base_model_version: sd_v1, sd_v2 (OpenCLIP-H, 1024-wide context), sdxl_base_v1-0, sd3_m, flux1.

    A1111 lists an SDXL LoRA under SDXL models only when this starts with "sdxl_".
    """
    family = family_of(denoiser)
    if family.arch == "sd" and denoiser.config.cross_attention_dim == 1024:
        return "sd_v2"
    return family.base_model_version


def is_adaptable_text_encoder(model: nn.Module) -> bool:
    """A CLIP text tower (adapted with --train_text_encoder); T5 is not."""
    return getattr(getattr(model, "config", None), "model_type", None) in ADAPTABLE_TEXT_ENCODERS
