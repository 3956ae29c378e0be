"""Adapters of every kind on a pipeline: native SingLoRA files, diffusers / kohya LoRA files,
and the PEFT LoRA/DoRA baselines. Checking a file, loading it, its strength, turning every
adapter off for a block, and back to the exact base model: each is written once, here.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import BadInput
from .format import FORMAT, find_adapter_file, load_adapter, read_adapter, read_metadata
from .inject import remove_singlora, set_scale, singlora_modules
from .pipelines import pipeline_components


def _models(pipe_or_models) -> dict:
    """A pipeline's adaptable components, or a {name: model} dict as given."""
    return dict(pipe_or_models) if isinstance(pipe_or_models, dict) else pipeline_components(pipe_or_models)


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
                raise BadInput(f"{path}: {key} = {t.flatten()[:2].tolist()}; expected one finite number > 0")
        elif t.is_floating_point():
            bad = (~torch.isfinite(t)).sum().item()
            if bad:
                raise BadInput(f"{path}: tensor {key} holds {bad} NaN/Inf values of {t.numel()}; the training "
                                 f"that wrote it diverged")
    modules = {m.group(1) for key in tensors if (m := _LORA_DOWN.match(key))}
    if not modules:
        raise BadInput(f"{path} holds no LoRA modules ({len(tensors)} tensors, none named like "
                         f"'….lora_down.weight' or '….lora_A.weight'): it would act as the base model")
    return len(modules)


def check_adapter_file(path: str | os.PathLike) -> str:
    """Everything about an adapter file that needs no base model; returns its kind.

    Commands call it before loading a (large) base: a NaN, a lying header or an
    empty file is refused in one line first.
    """
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
        adapter = load_adapter(pipeline_components(pipe), path, allow_partial)
        set_strength(pipe, scale)
        return Loaded("singlora", len(adapter.tensors) - len(adapter.skipped), len(adapter.tensors))
    total = check_lora_file(path)
    # diffusers and kohya LoRA files: diffusers converts kohya keys itself, and only warns
    # in the log about keys it could not place, so the placed modules are counted here.
    pipe.load_lora_weights(str(path), adapter_name="default")
    loaded = Loaded("lora", _peft_layers(pipe), total)
    if loaded.loaded == 0 or (loaded.note and not allow_partial):
        remove_adapter(pipe)
        what = "none" if loaded.loaded == 0 else f"only {loaded.loaded}"
        raise BadInput(f"{path}: {what} of its {total} LoRA modules fit a layer of this base model (wrong "
                         f"base model?)" + ("; pass --allow_partial to load the ones that fit" if loaded.loaded else ""))
    set_strength(pipe, scale)
    return loaded


def set_strength(pipe_or_models, scale: float) -> None:
    """Every adapter of every component at strength `scale`, whatever its kind.

    SingLoRA layers scale their update (layer.scale); PEFT LoRA/DoRA layers (our
    baselines, and LoRA files diffusers loaded through PEFT) get PEFT's own
    set_scale, which is what diffusers' pipe.set_adapters(…, adapter_weights) calls.
    """
    from peft.tuners.lora import LoraLayer

    if not math.isfinite(scale):
        raise BadInput(f"adapter strength must be a finite number, got {scale}")
    for model in _models(pipe_or_models).values():
        set_scale(model, scale)
        for m in model.modules():
            if isinstance(m, LoraLayer):
                for name in m.active_adapters:
                    m.set_scale(name, scale)


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

    models = list(_models(pipe).values())
    singlora = [m for model in models for m in singlora_modules(model).values()]
    scales = [m.scale for m in singlora]
    peft_layers = [m for model in models for m in model.modules()
                   if isinstance(m, BaseTunerLayer) and not m.disable_adapters]
    for m in singlora:
        m.scale = 0.0
    for m in peft_layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m, s in zip(singlora, scales):
            m.scale = s
        for m in peft_layers:
            m.enable_adapters(True)
