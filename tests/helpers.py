"""Test helpers: a tiny pipeline with a trained-looking SingLoRA adapter; a free port."""
import socket

import torch

from singlora_diffusion import AdapterConfig, set_step, singlora_modules
from singlora_diffusion.generate import render
from singlora_diffusion.pipelines import inject_adapters, load_pipeline, pipeline_components

PROMPT = "a photo of sks dog"


def adapted_pipeline(base, rank=4, alpha=8.0, ramp_up_steps=10, step=7, text_encoders=True):
    """Tiny pipeline + SingLoRA on UNet (and text encoders) with A scaled up and u = step/T."""
    pipe = load_pipeline(base)
    components = pipeline_components(pipe)
    cfg = AdapterConfig(rank=rank, alpha=alpha, text_encoder_target_modules="attn" if text_encoders else None)
    inject_adapters(components, cfg, ramp_up_steps)
    for model in components.values():
        set_step(model, step)
        with torch.no_grad():
            for m in singlora_modules(model).values():
                m.singlora_A.mul_(3)  # as if trained: the update is far above numerical noise
    return pipe, components, cfg


def latents(pipe, seed=0):
    return render(pipe, PROMPT, seed=seed, steps=3, output_type="latent")


def free_port() -> int:
    """A port no other test (or test run) uses right now: tests may run in parallel, so none is fixed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
