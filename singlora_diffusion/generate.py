"""Rendering with a native SingLoRA file or any diffusers / kohya LoRA file."""
from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
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


def adapter_kind(path: str | os.PathLike) -> str | None:
    """"singlora", "lora" (diffusers / kohya / PEFT keys) or None, from the file's header alone."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("format") == FORMAT:
                return "singlora"
            keys = f.keys()
    except Exception:  # not a safetensors file at all
        return None
    return "lora" if any("lora" in k.lower() for k in keys) else None


# The down (A) factor of one LoRA module in every layout diffusers reads: PEFT/diffusers
# (lora_A), kohya (lora_down), and the older diffusers attention-processor names.
_LORA_DOWN = re.compile(r"^(.+?)[._](?:lora_down|lora_A|lora\.down|lora_linear_layer\.down)\.weight$")


def check_lora_file(path: Path) -> int:
    """The number of LoRA modules in a diffusers / kohya file, after refusing what cannot be right.

    Refused: no LoRA module at all (it would act as the base model), NaN/Inf in
    any tensor, an alpha that is not > 0.
    """
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    for key, t in tensors.items():
        if key.endswith(".alpha"):
            if t.numel() != 1 or not 0 < float(t) < float("inf"):
                raise ValueError(f"{path}: {key} = {t.flatten()[:2].tolist()}; expected one finite number > 0")
        elif t.is_floating_point():
            bad = (~torch.isfinite(t)).sum().item()
            if bad:
                raise ValueError(f"{path}: tensor {key} holds {bad} NaN/Inf values of {t.numel()}; the training "
                                 f"that wrote it diverged")
    modules = {m.group(1) for key in tensors if (m := _LORA_DOWN.match(key))}
    if not modules:
        raise ValueError(f"{path} holds no LoRA modules ({len(tensors)} tensors, none named like "
                         f"'….lora_down.weight' or '….lora_A.weight'): it would act as the base model")
    return len(modules)


def check_adapter_file(path: str | os.PathLike) -> str:
    """Everything about an adapter file that needs no base model; returns its kind.

    Commands call it before loading a (large) base: a NaN, a lying header or an
    empty file is refused in one line first.
    """
    from .format import read_adapter

    path = find_adapter_file(path)
    if read_metadata(path).get("format") == FORMAT:
        read_adapter(path)  # check_adapter
        return "singlora"
    check_lora_file(path)
    return "lora"


@dataclass
class Loaded:
    """What apply_adapter loaded: kind, and how many of the file's modules found a layer."""
    kind: str                # "singlora" | "lora"
    loaded: int
    total: int

    @property
    def note(self) -> str | None:
        if self.loaded == self.total:
            return None
        return f"partial load: {self.loaded} of {self.total} modules fit this base; {self.total - self.loaded} skipped"


def _peft_layers(pipe) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(isinstance(m, BaseTunerLayer) and "default" in getattr(m, "lora_A", {})
               for model in pipeline_components(pipe).values() for m in model.modules())


def apply_adapter(pipe, path: str | os.PathLike, scale: float = 1.0, allow_partial: bool = False) -> Loaded:
    """Load an adapter into `pipe` at strength `scale`, after checking it (check_adapter, check_lora_file).

    A file whose keys fit the base only in part is refused (the pipeline left as
    it was) unless allow_partial; Loaded.note then says how much was left out.
    """
    path = find_adapter_file(path)
    if read_metadata(path).get("format") == FORMAT:
        components = pipeline_components(pipe)
        adapter = load_adapter(components, path, allow_partial)
        for model in components.values():
            set_scale(model, scale)
        return Loaded("singlora", len(adapter.tensors) - len(adapter.skipped), len(adapter.tensors))
    total = check_lora_file(path)
    # diffusers and kohya LoRA files: diffusers converts kohya keys itself, and only warns
    # in the log about keys it could not place, so the placed modules are counted here.
    pipe.load_lora_weights(str(path), adapter_name="default")
    loaded = Loaded("lora", _peft_layers(pipe), total)
    if loaded.loaded == 0 or (loaded.note and not allow_partial):
        remove_adapter(pipe)
        what = "none" if loaded.loaded == 0 else f"only {loaded.loaded}"
        raise ValueError(f"{path}: {what} of its {total} LoRA modules fit a layer of this base model (wrong "
                         f"base model?)" + ("; pass --allow_partial to load the ones that fit" if loaded.loaded else ""))
    pipe.set_adapters(["default"], adapter_weights=[scale])
    return loaded


def remove_adapter(pipe) -> None:
    """Back to the exact base model, whichever kind of adapter (or part of one) is loaded."""
    for model in pipeline_components(pipe).values():
        remove_singlora(model)
    pipe.unload_lora_weights()


@contextlib.contextmanager
def adapters_off(pipe):
    """The exact base model for the block: every adapter of every component off, whatever its kind.

    SingLoRA layers run at scale 0 (coefficient 0: the base output exactly);
    PEFT layers (our LoRA/DoRA baselines and LoRA files loaded by diffusers,
    which uses PEFT) are disabled. Everything is restored afterwards.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    from .inject import adapter_scale

    models = list(pipeline_components(pipe).values())
    peft_layers = [m for model in models for m in model.modules()
                   if isinstance(m, BaseTunerLayer) and not m.disable_adapters]
    with contextlib.ExitStack() as stack:
        for model in models:
            stack.enter_context(adapter_scale(model, 0.0))
        for m in peft_layers:
            m.enable_adapters(False)
        try:
            yield
        finally:
            for m in peft_layers:
                m.enable_adapters(True)


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
