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


def render(pipe, prompt: str, seed: int = 0, steps: int = 25, guidance: float = 7.5,
           negative_prompt: str | None = None, width: int | None = None, height: int | None = None,
           num_images: int = 1, output_type: str = "pil", on_step=None):
    """Images (or latents) for one prompt with a seeded CPU generator, so runs are reproducible anywhere.

    on_step(steps_done, steps) runs after every denoising step; an exception it
    raises stops the render there (the web UI's cancel).
    """
    generator = torch.Generator("cpu").manual_seed(seed)
    extra = {}
    if on_step is not None:
        def callback(_pipe, index, _timestep, tensors):
            on_step(index + 1, steps)
            return tensors
        extra["callback_on_step_end"] = callback
    with decode_in_vae_dtype(pipe.vae):
        return pipe(prompt, negative_prompt=negative_prompt, num_inference_steps=steps, guidance_scale=guidance,
                    width=width, height=height, num_images_per_prompt=num_images, generator=generator,
                    output_type=output_type, **extra).images
