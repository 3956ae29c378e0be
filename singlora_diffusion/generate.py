"""Rendering: seeded, with the VAE fed in its own dtype (adapters are loaded by adapters.py)."""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def decode_in_vae_dtype(vae):
    """Hand the VAE its latents in its own dtype while the block runs.

    The pipelines pass the UNet's latents to vae.decode unchanged. When the VAE
    is kept in float32 beside an fp16 UNet (its config's force_upcast: SD1.5 and
    SDXL VAEs overflow in fp16), that crashes ("Input type (c10::Half) and bias
    type (float)"). Running the decode under fp16 autocast instead would bring
    the overflow back, so the input is cast at the VAE's entry modules.
    """
    dtype = vae.dtype

    def cast(_module, args):
        return (args[0].to(dtype), *args[1:])
    entries = [m for m in (getattr(vae, "post_quant_conv", None), getattr(vae, "decoder", None)) if m is not None]
    handles = [m.register_forward_pre_hook(cast) for m in entries]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def pipeline_arch(pipe) -> str:
    """The family ("sd", "sdxl", "sd3", "flux") of a pipeline, from its denoiser."""
    from .families import family_of
    from .pipelines import denoiser

    return family_of(denoiser(pipe)).arch


def encode_prompt(pipe, prompt: str, negative_prompt: str | None = None, guidance: bool = False,
                  max_sequence_length: int | None = None, device=None) -> dict:
    """One prompt through the pipeline's own encode_prompt, as its __call__ keyword arguments:
    prompt_embeds and, by family, pooled_prompt_embeds; with guidance (classifier-free, SD /
    SDXL / SD3) also the negative ones, made as the pipeline makes them (SDXL's zeros for an
    empty negative prompt included). Flux has no negative: its guidance is an input of the model.

    max_sequence_length: T5's tokens (SD3, Flux); None = the pipeline's own default.
    device: the pipeline's execution device, when the caller knows it (finding it walks every module).
    """
    arch, device = pipeline_arch(pipe), device or pipe._execution_device
    t5 = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
    if arch == "sd":
        embeds, negative = pipe.encode_prompt(prompt, device, 1, guidance, negative_prompt)
        out = {"prompt_embeds": embeds, "negative_prompt_embeds": negative}
    elif arch == "flux":
        embeds, pooled, _text_ids = pipe.encode_prompt(prompt, None, device=device, num_images_per_prompt=1, **t5)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
    else:  # sdxl, sd3: CLIP-L ⊕ CLIP-G (SD3: then T5's tokens); pooled: both CLIP projections
        more = {"prompt_2": None, "prompt_3": None, **t5} if arch == "sd3" else {}
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=guidance,
            negative_prompt=negative_prompt, **more)
        out = {"prompt_embeds": embeds, "negative_prompt_embeds": negative, "pooled_prompt_embeds": pooled,
               "negative_pooled_prompt_embeds": negative_pooled}
    return {k: v for k, v in out.items() if v is not None}


def render(pipe, prompt: str, seed: int = 0, steps: int = 25, guidance: float = 7.5,
           negative_prompt: str | None = None, width: int | None = None, height: int | None = None,
           num_images: int = 1, output_type: str = "pil", on_step=None, embeds: dict | None = None):
    """Images (or latents) for one prompt with a seeded CPU generator, so runs are reproducible anywhere.

    on_step(steps_done, steps) runs after every denoising step; an exception it
    raises stops the render there (the web UI's cancel).
    embeds: the prompt (and negative prompt) already encoded (encode_prompt with guidance), used
    instead of the strings, so a pipeline whose text encoders were freed still renders.
    """
    generator = torch.Generator("cpu").manual_seed(seed)
    extra = {}
    if on_step is not None:
        def callback(_pipe, index, _timestep, tensors):
            on_step(index + 1, steps)
            return tensors
        extra["callback_on_step_end"] = callback
    text = {"prompt": prompt, "negative_prompt": negative_prompt} if embeds is None else embeds
    per_prompt = num_images
    if embeds is not None and num_images > 1 and pipeline_arch(pipe) in ("sd3", "flux"):
        # SD3's and Flux's encode_prompt repeat embeddings per image only when they encode the
        # string; given ones count as one prompt per row (SD's and SDXL's repeat them: not there)
        text = {k: v.repeat(num_images, *([1] * (v.dim() - 1))) for k, v in embeds.items()}
        per_prompt = 1
    with decode_in_vae_dtype(pipe.vae):
        return pipe(**text, num_inference_steps=steps, guidance_scale=guidance,
                    width=width, height=height, num_images_per_prompt=per_prompt, generator=generator,
                    output_type=output_type, **extra).images
