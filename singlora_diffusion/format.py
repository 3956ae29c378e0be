"""The SingLoRA file: one .safetensors file, documented in docs/format.md.

    {component}.{module_path}.singlora_A      float32 (n, r), n = max(d_in, d_out)

component is unet or transformer (SD3/Flux), text_encoder or text_encoder_2 (CLIP);
module_path is the path LoRA files use (diffusers UNet / transformer names; CLIP text
encoders with the `text_model.` level that transformers 5 no longer has in
named_modules()). `__metadata__` holds strings: format, format_version, rank, alpha,
ramp_up_steps, step, target_modules, text_encoder_target_modules, base_model, base_arch
(sd | sdxl | sd3 | flux), base_model_version (kohya's ss_base_model_version: sd_v1 |
sd_v2 | sdxl_base_v1-0 | sd3_m | flux1) and
module_shapes ({component.module_path: [d_out, d_in]}, which export needs to
split non-square layers without the base model). Weights are never unpickled.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .files import atomic_path
from .inject import get_step, inject_singlora, set_step, singlora_modules
from .families import DENOISERS, base_arch, base_model_version, denoiser_name
from .targets import COMPONENT_KIND, resolve_patterns
from .errors import BadInput, NotFound

FORMAT, FORMAT_VERSION = "singlora", "1"
SUFFIX = ".singlora_A"
WEIGHTS_NAME = "singlora_weights.safetensors"
TEXT_PREFIX = "text_model."


def file_module_path(component: str, name: str) -> str:
    """Module path as written in files (CLIP encoders keep `text_model.`)."""
    if COMPONENT_KIND[component] == "text_encoder" and not name.startswith(TEXT_PREFIX):
        return TEXT_PREFIX + name
    return name


def model_module_path(model: nn.Module, component: str, path: str) -> str:
    """The inverse for this model: drop `text_model.` if this transformers version has no such level."""
    if COMPONENT_KIND[component] == "text_encoder" and not hasattr(model, "text_model"):
        return path.removeprefix(TEXT_PREFIX)
    return path


@dataclass
class AdapterFile:
    path: str
    tensors: dict[str, torch.Tensor]       # "{component}.{module_path}" -> A
    metadata: dict[str, str]
    skipped: list[str] = field(default_factory=list)  # keys a partial load left out (load_adapter)

    @property
    def rank(self) -> int:
        return int(self.metadata["rank"])

    @property
    def alpha(self) -> float:
        return float(self.metadata["alpha"])

    @property
    def step(self) -> int:
        return int(self.metadata["step"])

    @property
    def ramp_up_steps(self) -> int:
        return int(self.metadata["ramp_up_steps"])

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        return {k: tuple(v) for k, v in json.loads(self.metadata["module_shapes"]).items()}

    def by_component(self) -> dict[str, dict[str, torch.Tensor]]:
        out: dict[str, dict[str, torch.Tensor]] = {}
        for key, A in self.tensors.items():
            component, _, path = key.partition(".")
            out.setdefault(component, {})[path] = A
        return out


def save_adapter(path: str | os.PathLike, components: dict[str, nn.Module], base_model: str,
                 target_modules=None, text_encoder_target_modules=None) -> Path:
    """Write every SingLoRA layer of `components` to one .safetensors file.

    Pass the pipeline's denoiser even when only text encoders carry adapters: base_arch is
    read from it (SDXL's and SD3's second text encoders are both CLIP-bigG).
    """
    from safetensors.torch import save_file

    tensors, shapes, settings = {}, {}, set()
    for component, model in components.items():
        for name, m in singlora_modules(model).items():
            key = f"{component}.{file_module_path(component, name)}"
            tensors[key + SUFFIX] = m.singlora_A.detach().to("cpu", torch.float32).contiguous()
            shapes[key] = [m.d_out, m.d_in]
            settings.add((m.rank, m.alpha, m.ramp_up_steps))
    if not tensors:
        raise BadInput("nothing to save: no SingLoRA layer in the given components")
    if len(settings) > 1:
        raise BadInput(f"layers differ in (rank, alpha, ramp_up_steps): {sorted(settings)}; "
                         f"format v{FORMAT_VERSION} stores one setting per file")
    (rank, alpha, ramp_up_steps), = settings
    step = max(get_step(m) for m in components.values())
    denoiser = denoiser_name(components)
    denoiser_modules = sorted({k.rpartition(".")[2] for k in shapes if k.partition(".")[0] in DENOISERS})
    metadata = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "rank": str(rank), "alpha": repr(float(alpha)),
        "ramp_up_steps": str(ramp_up_steps), "step": str(step),
        # the patterns, presets resolved ("attn" -> ["to_q", ...]), so readers need no preset table
        "target_modules": json.dumps(list(resolve_patterns(target_modules, COMPONENT_KIND[denoiser or "unet"]))
                                     if target_modules is not None else denoiser_modules),
        "text_encoder_target_modules": json.dumps(None if text_encoder_target_modules is None else
                                                  list(resolve_patterns(text_encoder_target_modules, "text_encoder"))),
        # from the denoiser's config, not from which components carry adapters: a UNet-only SDXL
        # adapter is still an SDXL adapter
        **({"base_arch": base_arch(components[denoiser]), "base_model_version": base_model_version(components[denoiser])}
           if denoiser else {"base_arch": "sdxl" if "text_encoder_2" in components else "sd"}),
        "base_model": str(base_model),
        "module_shapes": json.dumps(shapes),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:  # a crash mid-write never leaves a truncated adapter behind
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def diffusers_lora_name() -> str:
    """The file name diffusers writes and finds LoRA weights under (pytorch_lora_weights.safetensors).

    Taken from diffusers when asked, not at import: importing diffusers takes seconds,
    and reading a SingLoRA file needs none of it.
    """
    from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE

    return LORA_WEIGHT_NAME_SAFE


def find_adapter_file(path: str | os.PathLike, what: str = "adapter") -> Path:
    """A file as given, or the adapter inside a training output folder (the SingLoRA file first)."""
    path = Path(path)
    if path.is_dir():
        for name in (WEIGHTS_NAME, diffusers_lora_name()):
            if (path / name).is_file():
                return path / name
    if not path.is_file():
        raise NotFound(f"no {what} at {path}: pass a .safetensors file or a folder that holds "
                       f"{WEIGHTS_NAME} or {diffusers_lora_name()}")
    if path.suffix != ".safetensors":
        raise BadInput(f"adapter {path}: only .safetensors files are read (never pickles)")
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for non-safetensors input
        raise BadInput(f"{path} is not a readable .safetensors file ({e})") from e


def read_adapter(path: str | os.PathLike) -> AdapterFile:
    """Read and check a SingLoRA file (no model needed)."""
    from safetensors.torch import load_file

    path = find_adapter_file(path, "SingLoRA adapter")
    metadata = read_metadata(path)
    if metadata.get("format") != FORMAT:
        raise BadInput(f"{path} is not a SingLoRA file (metadata format={metadata.get('format')!r}); "
                         f"a diffusers or kohya LoRA file is loaded with pipe.load_lora_weights instead")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise BadInput(f"{path} has SingLoRA format_version {metadata.get('format_version')!r}; this "
                         f"version of singlora-diffusion reads version {FORMAT_VERSION}: upgrade it")
    for key in ("rank", "alpha", "ramp_up_steps", "step", "module_shapes"):
        if key not in metadata:
            raise BadInput(f"{path}: metadata key {key!r} is missing; the file is damaged or not written by singlora")
    tensors = {}
    for key, A in load_file(str(path)).items():
        if not key.endswith(SUFFIX) or key.partition(".")[0] not in COMPONENT_KIND:
            raise BadInput(f"{path}: unexpected tensor {key!r}; expected '{{{'|'.join(COMPONENT_KIND)}}}"
                             f".<module path>{SUFFIX}'")
        tensors[key[: -len(SUFFIX)]] = A
    adapter = AdapterFile(str(path), tensors, metadata)
    check_adapter(adapter)
    return adapter


def _number(adapter: AdapterFile, key: str, kind, low, what: str):
    try:
        value = kind(adapter.metadata[key])
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value < low:
        raise BadInput(f"{adapter.path}: metadata {key}={adapter.metadata[key]!r}; expected {what}. The file is "
                         f"damaged or was edited by hand: re-export it from its training run")
    return value


def check_matrix(path, name: str, A: torch.Tensor) -> None:
    """A SingLoRA A: a float (n, r) matrix of finite numbers (NaN/Inf: the training diverged)."""
    if A.ndim != 2 or not A.is_floating_point():
        raise BadInput(f"{path}: tensor {name} is {A.dtype} of shape {tuple(A.shape)}; expected a float (n, r)")
    bad = (~torch.isfinite(A)).sum().item()
    if bad:
        raise BadInput(f"{path}: tensor {name} holds {bad} NaN/Inf values of {A.numel()}; the training that "
                       f"wrote it diverged: use an earlier checkpoint")


def check_adapter(adapter: AdapterFile) -> None:
    """Refuse a file whose tensors are not finite or whose metadata contradicts them.

    Everything that reads a SingLoRA file goes through this (read_adapter), so a
    NaN or a lying rank stops here instead of reaching an image, an export or a
    merged pipeline: metadata rank 4 over rank-8 tensors would export a LoRA 2x
    too strong; a wrong module_shapes entry, one that cannot be loaded.
    """
    path = adapter.path
    if not adapter.tensors:
        raise BadInput(f"{path} holds no adapter tensors: an empty file would act as the base model")
    rank = _number(adapter, "rank", int, 1, "a whole number >= 1")
    _number(adapter, "alpha", float, 1e-300, "a finite number > 0")
    _number(adapter, "ramp_up_steps", int, 0, "a whole number >= 0")
    _number(adapter, "step", int, 0, "a whole number >= 0")
    try:
        shapes = adapter.shapes
        if not all(len(v) == 2 and all(isinstance(d, int) and d > 0 for d in v) for v in shapes.values()):
            raise ValueError
    except (ValueError, TypeError, AttributeError):
        raise BadInput(f"{path}: metadata module_shapes is not a JSON map of module -> [d_out, d_in]") from None
    for key, A in adapter.tensors.items():
        name = key + SUFFIX
        if key not in shapes:
            raise BadInput(f"{path}: tensor {name} has no module_shapes entry; export cannot split it")
        check_matrix(path, name, A)
        d_out, d_in = shapes[key]
        if tuple(A.shape) != (max(d_out, d_in), rank):
            raise BadInput(f"{path}: tensor {name} has shape {tuple(A.shape)}, but the metadata (rank {rank}, "
                             f"module_shapes {[d_out, d_in]}) says {(max(d_out, d_in), rank)}")
    extra = sorted(set(shapes) - set(adapter.tensors))
    if extra:
        raise BadInput(f"{path}: module_shapes lists {len(extra)} modules without a tensor, e.g. {extra[0]}")


def _validate_against(adapter: AdapterFile, components: dict[str, nn.Module],
                      allow_partial: bool = False) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """component -> {model module path: A}, and the keys that fit no layer of this base.

    A key that fits nothing is refused (one line naming it) unless allow_partial;
    a partial load is then reported by the caller with counts.
    """
    plan: dict[str, dict[str, torch.Tensor]] = {}
    misfits: list[tuple[str, str]] = []  # (key, why)
    trained_on = adapter.metadata.get("base_model")

    def misfit(message: str, key: str) -> None:
        misfits.append((key, message))

    for component, entries in adapter.by_component().items():
        model = components.get(component)
        modules = dict(model.named_modules()) if model is not None else {}
        for path, A in entries.items():
            key = f"{component}.{path}{SUFFIX}"
            if model is None:
                misfit(f"key {key} is for {component!r}, which this pipeline lacks", key)
                continue
            name = model_module_path(model, component, path)
            layer = modules.get(name)
            if not isinstance(layer, nn.Linear):
                misfit(f"key {key} names no Linear layer in this {component}", key)
                continue
            d_out, d_in = layer.out_features, layer.in_features  # a quantized weight is packed
            expected = (max(d_in, d_out), adapter.rank)
            if tuple(A.shape) != expected:
                misfit(f"key {key} has shape {tuple(A.shape)} but this base's Linear({d_in} -> {d_out}) needs "
                       f"{expected}", key)
                continue
            plan.setdefault(component, {})[name] = A
    if misfits and (not plan or not allow_partial):
        fitting = len(adapter.tensors) - len(misfits)
        raise BadInput(f"{adapter.path}: {len(misfits)} of its {len(adapter.tensors)} keys fit no layer of this base, "
                         f"e.g. {misfits[0][1]} (wrong base model? the file was trained on {trained_on})"
                         + (f"; pass --allow_partial to load the {fitting} that fit" if fitting else ""))
    return plan, [key for key, _ in misfits]


def load_adapter(components: dict[str, nn.Module], source: str | os.PathLike | AdapterFile,
                 allow_partial: bool = False) -> AdapterFile:
    """Inject the file's layers into `components` and restore A, α, T and the step exactly.

    `source`: a path, or an AdapterFile already read (and checked) by read_adapter.
    Checks every key against the base before touching any model. With
    allow_partial, keys that fit no layer are left out and listed in `.skipped`.
    """
    adapter = source if isinstance(source, AdapterFile) else read_adapter(source)
    plan, adapter.skipped = _validate_against(adapter, components, allow_partial)
    for component, entries in plan.items():
        model = components[component]
        # Exact names (escaped regexes); the seed only fills A before it is overwritten.
        inject_singlora(model, [re.escape(n) for n in entries], adapter.rank, adapter.alpha,
                        adapter.ramp_up_steps, seed=0, kind=COMPONENT_KIND[component])
        wrapped = singlora_modules(model)
        with torch.no_grad():
            for name, A in entries.items():
                wrapped[name].singlora_A.copy_(A)
        set_step(model, adapter.step)
    return adapter
