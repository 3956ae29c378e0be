"""Converters at the edge: a SingLoRA file as a standard LoRA, or merged into a full pipeline.

ΔW = (α/r)·u·A[:d_out]·A[:d_in]ᵀ has rank ≤ r, so it *is* a LoRA with
lora_down = A[:d_in]ᵀ and lora_up = coef·A[:d_out] (layer.lowrank_factors).
"""
from __future__ import annotations
from .errors import BadInput, WriteError

import math
import os
from pathlib import Path

import torch

from .files import atomic_path
from .format import AdapterFile, diffusers_lora_name, read_adapter
from .layer import lowrank_factors, ramp

# kohya / A1111 / ComfyUI prefixes per component; SDXL numbers its two text encoders.
# kohya's names are written here rather than with diffusers' convert_state_dict_to_kohya: that
# converter names the text encoder lora_te1 on every base (SD1.x files read by A1111 use lora_te)
# and writes .alpha = rank, where these files keep the user's α beside unfolded factors.
KOHYA_PREFIX = {
    "sd": {"unet": "lora_unet", "text_encoder": "lora_te"},
    "sdxl": {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
}


def kohya_base_version(adapter: AdapterFile) -> str:
    """ss_base_model_version as kohya's tools write it; files older than base_model_version get it from base_arch."""
    if "base_model_version" in adapter.metadata:
        return adapter.metadata["base_model_version"]
    return "sdxl_base_v1-0" if adapter.metadata.get("base_arch") == "sdxl" else "sd_v1"


def _factors(adapter: AdapterFile, fold_alpha: bool):
    """Yield (component, module_path, up, down) with u(step) (and α/r if fold_alpha) in `up`."""
    u = float(ramp(adapter.step, adapter.ramp_up_steps))
    coef = u * (adapter.alpha / adapter.rank if fold_alpha else 1.0)
    shapes = adapter.shapes
    for key, A in adapter.tensors.items():
        component, _, path = key.partition(".")
        d_out, d_in = shapes[key]
        up, down = lowrank_factors(A.to(torch.float32), d_out, d_in, coef)
        yield component, path, up.contiguous(), down.contiguous()


def export_diffusers(adapter_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write OUT_DIR/pytorch_lora_weights.safetensors for pipe.load_lora_weights(OUT_DIR).

    α/r and u are folded into lora_B, so the file needs no alpha: diffusers'
    default lora_alpha = r (scale 1) reproduces ΔW exactly.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    adapter = read_adapter(adapter_path)
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for component, path, up, down in _factors(adapter, fold_alpha=True):
        layers.setdefault(component, {})[f"{path}.lora_A.weight"] = down
        layers[component][f"{path}.lora_B.weight"] = up
    kwargs = {f"{c}_lora_layers": layers[c] for c in layers}
    writer = StableDiffusionXLPipeline if adapter.metadata.get("base_arch") == "sdxl" else StableDiffusionPipeline
    writer.save_lora_weights(str(out_dir), **kwargs)
    return Path(out_dir) / diffusers_lora_name()


def export_kohya(adapter_path: str | os.PathLike, out_file: str | os.PathLike) -> Path:
    """Write the kohya layout A1111 and ComfyUI read: lora_unet_… / lora_te_… with .alpha = α."""
    from safetensors.torch import save_file

    adapter = read_adapter(adapter_path)
    prefixes = KOHYA_PREFIX[adapter.metadata.get("base_arch", "sd")]
    tensors = {}
    for component, path, up, down in _factors(adapter, fold_alpha=False):
        key = f"{prefixes[component]}_{path.replace('.', '_')}"
        tensors[f"{key}.lora_down.weight"] = down
        tensors[f"{key}.lora_up.weight"] = up
        # Loaders scale by alpha / rank(lora_down): this keeps the user's α visible.
        tensors[f"{key}.alpha"] = torch.tensor(adapter.alpha, dtype=torch.float32)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(adapter.rank),
            "ss_network_alpha": str(adapter.alpha), "ss_base_model_version": kohya_base_version(adapter),
            "singlora_source": os.path.basename(adapter.path), "singlora_step": str(adapter.step)}
    with atomic_path(out_file) as tmp:  # a failed write leaves an earlier file of that name as it was
        save_file(tensors, str(tmp), metadata=meta)
    return out_file


def merge_into_pipeline(base: str | os.PathLike, adapter_path: str | os.PathLike, out_dir: str | os.PathLike,
                        scale: float = 1.0, dtype: torch.dtype = torch.float32, allow_partial: bool = False,
                        log=print) -> Path:
    """Save a full diffusers pipeline folder with ΔW folded into the base weights.

    `dtype`: the saved weights'; W0 + ΔW is summed in float32 and rounded once
    (SingLoRALinear.merge). A merged weight that is not finite in `dtype` (fp16
    overflows above 65504) is refused before anything is written. The folder is
    written beside `out_dir` and renamed into place, so a failed save (a full
    disk) leaves an earlier `out_dir` as it was.
    """
    from .adapters import set_strength
    from .format import load_adapter
    from .inject import remove_singlora, singlora_modules
    from .pipelines import load_pipeline, pipeline_components

    if not math.isfinite(scale):
        raise BadInput(f"--scale {scale}: expected a finite number")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "model_index.json").is_file():
        raise BadInput(f"{out_dir} exists and is not a pipeline folder; give a new folder (nothing was written)")
    adapter = read_adapter(adapter_path)  # read and checked before the (large) base loads
    pipe = load_pipeline(base, dtype=dtype)
    components = pipeline_components(pipe)
    adapter = load_adapter(components, adapter, allow_partial)
    if adapter.skipped:
        log(f"{adapter_path}: partial merge: {len(adapter.tensors) - len(adapter.skipped)} of "
            f"{len(adapter.tensors)} modules fit this base; {len(adapter.skipped)} skipped, e.g. {adapter.skipped[0]}")
    set_strength(components, scale)
    for component, model in components.items():
        merged = singlora_modules(model)
        remove_singlora(model, merge=True)
        for name in merged:
            weight = model.get_submodule(name).weight
            if not torch.isfinite(weight).all():
                raise BadInput(f"merged weight {component}.{name} is not finite in {dtype} (scale {scale}); "
                                 f"nothing was written: lower --scale or use --save_precision fp32")
    try:
        with atomic_path(out_dir, replace_folder=True) as tmp:
            pipe.save_pretrained(str(tmp))
    except OSError as e:
        raise WriteError(f"could not write the merged pipeline next to {out_dir} ({e.strerror or e}); "
                         f"nothing at {out_dir} was changed") from None
    return out_dir
