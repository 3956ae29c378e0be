"""Rendering with a native SingLoRA file or any diffusers / kohya LoRA file."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .format import FORMAT, WEIGHTS_NAME, load_adapter, read_metadata
from .inject import remove_singlora, set_scale
from .pipelines import pipeline_components

DIFFUSERS_LORA_NAME = "pytorch_lora_weights.safetensors"


def find_adapter_file(path: str | os.PathLike) -> Path:
    """A file as given, or the adapter inside a training output folder (native file first)."""
    path = Path(path)
    if path.is_dir():
        for name in (WEIGHTS_NAME, DIFFUSERS_LORA_NAME):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{path} holds neither {WEIGHTS_NAME} nor {DIFFUSERS_LORA_NAME}")
    if not path.is_file():
        raise FileNotFoundError(f"adapter {path} does not exist")
    if path.suffix != ".safetensors":
        raise ValueError(f"adapter {path}: only .safetensors files are read (never pickles)")
    return path


def apply_adapter(pipe, path: str | os.PathLike, scale: float = 1.0) -> str:
    """Load an adapter into `pipe` at strength `scale`; returns "singlora" or "lora"."""
    path = find_adapter_file(path)
    if read_metadata(path).get("format") == FORMAT:
        components = pipeline_components(pipe)
        load_adapter(components, path)
        for model in components.values():
            set_scale(model, scale)
        return "singlora"
    # diffusers and kohya LoRA files: diffusers converts kohya keys itself.
    pipe.load_lora_weights(str(path), adapter_name="default")
    pipe.set_adapters(["default"], adapter_weights=[scale])
    return "lora"


def remove_adapter(pipe) -> None:
    """Back to the exact base model, whichever kind of adapter (or part of one) is loaded."""
    for model in pipeline_components(pipe).values():
        remove_singlora(model)
    pipe.unload_lora_weights()


def render(pipe, prompt: str, seed: int = 0, steps: int = 25, guidance: float = 7.5,
           negative_prompt: str | None = None, width: int | None = None, height: int | None = None,
           num_images: int = 1, output_type: str = "pil"):
    """Images (or latents) for one prompt with a seeded CPU generator, so runs are reproducible anywhere."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(prompt, negative_prompt=negative_prompt, num_inference_steps=steps, guidance_scale=guidance,
                width=width, height=height, num_images_per_prompt=num_images, generator=generator,
                output_type=output_type).images
