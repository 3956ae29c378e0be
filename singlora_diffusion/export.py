"""Converters at the edge: a SingLoRA file as a standard LoRA, or merged into a full pipeline.

ΔW = (α/r)·u·A[:d_out]·A[:d_in]ᵀ has rank ≤ r, so it *is* a LoRA with
lora_down = A[:d_in]ᵀ and lora_up = coef·A[:d_out] (layer.lowrank_factors).
"""
from __future__ import annotations
from .errors import BadInput, WriteError

import math
import os
import re
from datetime import datetime, timezone
from pathlib import Path

import torch

from .files import atomic_path
from .format import AdapterFile, diffusers_lora_name, read_adapter
from .layer import lowrank_factors, ramp

# kohya / A1111 / ComfyUI prefixes per component; SDXL numbers its two text encoders.
# kohya's names are written here rather than with diffusers' convert_state_dict_to_kohya: that
# converter names the text encoder lora_te1 on every base (SD1.x files read by A1111 use lora_te)
# and writes .alpha = rank, where these files keep the user's α beside unfolded factors.
#
# SD3/3.5 and Flux.1: OneTrainer's names, lora_transformer_<diffusers module path>. ComfyUI's
# comfy/lora.py model_lora_keys_unet maps them through comfy/utils.py mmdit_to_diffusers /
# flux_to_diffusers onto its own weights, fused ones included: diffusers' separate to_q / to_k /
# to_v (add_*_proj, Flux single blocks' proj_mlp) become row slices (offsets) of ComfyUI's qkv /
# linear1, so every Linear of the diffusers transformer keeps its own pair and ΔW stays exact.
# model_lora_keys_clip maps lora_te1_ to CLIP-L and (SD3) lora_te2_ to CLIP-G, as for SDXL.
# kohya's own SD3/Flux names (lora_unet_joint_blocks_… / lora_unet_double_blocks_…_qkv) address
# the fused weights, which would need one pair for three diffusers layers.
KOHYA_PREFIX = {
    "sd": {"unet": "lora_unet", "text_encoder": "lora_te"},
    "sdxl": {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
    "sd3": {"transformer": "lora_transformer", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
    "flux": {"transformer": "lora_transformer", "text_encoder": "lora_te1"},  # text_encoder_2 is T5
}


def kohya_base_version(adapter: AdapterFile) -> str:
    """ss_base_model_version as kohya's tools write it; files older than base_model_version get it from base_arch."""
    from .families import FAMILIES

    if "base_model_version" in adapter.metadata:
        return adapter.metadata["base_model_version"]
    family = FAMILIES.get(adapter.metadata.get("base_arch", "sd"))
    return family.base_model_version if family is not None else "sd_v1"


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
    import diffusers

    from .families import FAMILIES

    adapter = read_adapter(adapter_path)
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for component, path, up, down in _factors(adapter, fold_alpha=True):
        layers.setdefault(component, {})[f"{path}.lora_A.weight"] = down
        layers[component][f"{path}.lora_B.weight"] = up
    kwargs = {f"{c}_lora_layers": layers[c] for c in layers}
    arch = adapter.metadata.get("base_arch", "sd")
    if arch not in FAMILIES:
        raise BadInput(f"{adapter.path}: metadata base_arch={arch!r}; expected one of {', '.join(FAMILIES)}")
    # the family's pipeline writes its own layout: unet. / transformer., text_encoder(_2).
    getattr(diffusers, FAMILIES[arch].pipeline).save_lora_weights(str(out_dir), **kwargs)
    return Path(out_dir) / diffusers_lora_name()


def kohya_state_dict(adapter: AdapterFile, training: dict | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The kohya layout A1111 and ComfyUI read, as (tensors, `__metadata__`), without writing a file.

    lora_unet_… / lora_te_… (SDXL: lora_te1_… / lora_te2_…; SD3 and Flux: lora_transformer_…,
    lora_te1_…, SD3 also lora_te2_…: KOHYA_PREFIX) with .lora_down.weight = A[:d_in]ᵀ,
    .lora_up.weight = u·A[:d_out] and .alpha = α: loaders scale by alpha / rank(lora_down), so
    up·down·α/r is ΔW exactly. Needs torch only (the ComfyUI node calls it, in an environment
    without diffusers). `training`: see kohya_metadata.
    """
    arch = adapter.metadata.get("base_arch", "sd")
    if arch not in KOHYA_PREFIX:
        raise BadInput(f"{adapter.path}: metadata base_arch={arch!r}; expected one of {sorted(KOHYA_PREFIX)}")
    prefixes = KOHYA_PREFIX[arch]
    tensors = {}
    for component, path, up, down in _factors(adapter, fold_alpha=False):
        if component not in prefixes:
            raise BadInput(f"{adapter.path}: {component} adapters on a base_arch={arch!r} file; "
                           f"kohya names only {sorted(prefixes)} for that base")
        key = f"{prefixes[component]}_{path.replace('.', '_')}"
        tensors[f"{key}.lora_down.weight"] = down
        tensors[f"{key}.lora_up.weight"] = up
        # Loaders scale by alpha / rank(lora_down): this keeps the user's α visible.
        tensors[f"{key}.alpha"] = torch.tensor(adapter.alpha, dtype=torch.float32)
    return tensors, kohya_metadata(adapter, training)


# modelspec (Stability AI's model metadata standard) as kohya's sd-scripts writes it for a LoRA
# (library/sai_model_spec.py, determine_architecture / determine_implementation /
# determine_resolution): architecture ids; SDXL LoRAs name the SGM implementation, Flux LoRAs
# black-forest-labs/flux, SD1.x/2.x and SD3 LoRAs diffusers; SDXL, SD3 and Flux default to 1024 px.
MODELSPEC_SPEC_VERSION = "1.0.1"
_SGM = "https://github.com/Stability-AI/generative-models"
_BFL = "https://github.com/black-forest-labs/flux"
# kohya's SD3 ids are "stable-diffusion-3-" + the variant ("5-large", "5-medium"; sd3_merge_lora.py),
# its Flux ids flux-1-dev / flux-1-schnell, and "stable-diffusion-3" / "flux-1" when the variant is
# unknown. A SingLoRA file names its variant only in its base_model (a hub id or a folder name).
_VARIANTS = {
    "sd3_m": (("3.5-large", "stable-diffusion-3-5-large"), ("3.5-medium", "stable-diffusion-3-5-medium"),
              ("3-medium", "stable-diffusion-3-medium")),
    "flux1": (("schnell", "flux-1-schnell"), ("dev", "flux-1-dev")),
}
_UNKNOWN_VARIANT = {"sd3_m": "stable-diffusion-3", "flux1": "flux-1"}


def _modelspec_arch(version: str, resolution: int | None, base_model: str = "") -> tuple[str, int]:
    """(architecture id, default resolution) for an ss_base_model_version (and, for SD3 and Flux,
    the base_model the adapter was trained on, whose name tells the variant).

    The file does not record SD2's prediction type: 768 px training means SD2's 768-v base,
    anything else its 512 base (what kohya decides from --v_parameterization).
    """
    if version.startswith("sdxl_"):
        return "stable-diffusion-xl-v1-base", 1024
    if version == "sd_v2":
        return ("stable-diffusion-v2-768-v", 768) if resolution == 768 else ("stable-diffusion-v2-512", 512)
    if version in _VARIANTS:
        name = Path(str(base_model).rstrip("/")).name.lower()  # "stabilityai/stable-diffusion-3.5-large"
        arch = next((a for marker, a in _VARIANTS[version]
                     if re.search(rf"(?:^|[^a-z0-9]){re.escape(marker)}(?:$|[^a-z0-9])", name)),
                    _UNKNOWN_VARIANT[version])
        return arch, 1024
    return "stable-diffusion-v1", 512


def _modelspec_implementation(arch: str) -> str:
    if arch.startswith("stable-diffusion-xl"):
        return _SGM
    return _BFL if arch.startswith("flux-") else "diffusers"


def _training_facts(training: dict | None) -> dict:
    """The known keys of `training` with their types checked; unknown keys and None values are ignored."""
    kinds = {"resolution": int, "max_train_steps": int, "output_name": str, "instance_prompt": str}
    facts = {}
    for key, kind in kinds.items():
        value = (training or {}).get(key)
        if value is None:
            continue
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 1):
            raise BadInput(f"export_kohya training[{key!r}]={value!r}: expected "
                           + ("a whole number >= 1" if kind is int else "a string"))
        facts[key] = value
    return facts


def kohya_metadata(adapter: AdapterFile, training: dict | None = None) -> dict[str, str]:
    """kohya's ss_* keys and the modelspec.* keys for the LoRA form of `adapter`.

    `training` (optional, from the trainer): "resolution" (int), "max_train_steps" (int),
    "output_name" (str), "instance_prompt" (str); unknown keys are ignored. Without them the
    keys they feed are left out, except the modelspec keys the standard requires (title: the
    adapter's file name; resolution: the base's native one). modelspec.date is when the
    adapter file was written, so exporting the same file twice gives the same metadata.
    """
    from . import __version__

    facts = _training_facts(training)
    version = kohya_base_version(adapter)
    arch, native_resolution = _modelspec_arch(version, facts.get("resolution"), adapter.metadata.get("base_model", ""))
    resolution = facts.get("resolution", native_resolution)
    source = Path(adapter.path)
    written = datetime.fromtimestamp(int(source.stat().st_mtime), timezone.utc)
    comment = "SingLoRA (arXiv 2507.05566) adapter as an exactly equivalent LoRA, by singlora-diffusion"
    meta = {
        "ss_network_module": "networks.lora", "ss_network_dim": str(adapter.rank),
        "ss_network_alpha": str(adapter.alpha), "ss_base_model_version": version,
        # A1111 picks SD2 LoRAs by ss_v2 (and SDXL ones by the sdxl_ prefix above)
        "ss_v2": str(version == "sd_v2"),
        "ss_steps": str(adapter.step),
        "ss_training_comment": comment + (f"; instance prompt: {facts['instance_prompt']}"
                                          if "instance_prompt" in facts else ""),
        "modelspec.sai_model_spec": MODELSPEC_SPEC_VERSION,
        "modelspec.architecture": f"{arch}/lora",
        "modelspec.implementation": _modelspec_implementation(arch),
        "modelspec.implementation_version": f"singlora-diffusion/{__version__}",
        "modelspec.title": facts.get("output_name", source.stem),
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": written.isoformat(),
        "singlora_source": source.name, "singlora_step": str(adapter.step),
    }
    if "base_model" in adapter.metadata:
        meta["ss_sd_model_name"] = adapter.metadata["base_model"]
    if "resolution" in facts:
        meta["ss_resolution"] = str((resolution, resolution))  # kohya's "(512, 512)"
    if "max_train_steps" in facts:
        meta["ss_max_train_steps"] = str(facts["max_train_steps"])
    if "output_name" in facts:
        meta["ss_output_name"] = facts["output_name"]
    if "instance_prompt" in facts:
        meta["modelspec.trigger_phrase"] = facts["instance_prompt"]
    return meta


def export_kohya(adapter_path: str | os.PathLike, out_file: str | os.PathLike,
                 training: dict | None = None) -> Path:
    """Write kohya_state_dict's tensors and metadata to `out_file`.

    `training`: facts of the run for the metadata (kohya_metadata); ss_output_name defaults
    to the file's stem, as kohya names its files after --output_name.
    """
    from safetensors.torch import save_file

    out_file = Path(out_file)
    tensors, meta = kohya_state_dict(read_adapter(adapter_path), {"output_name": out_file.stem, **(training or {})})
    out_file.parent.mkdir(parents=True, exist_ok=True)
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

    The folder is the hub's layout, which transformers 4, ComfyUI's diffusers loader and
    transformers 5 all read: each component one unsharded file, CLIPTextModel keys under
    `text_model.` (single_file.with_text_model_prefix).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "model_index.json").is_file():
        raise BadInput(f"{out_dir} exists and is not a pipeline folder; give a new folder (nothing was written)")
    pipe = merged_pipeline(base, adapter_path, scale, dtype, allow_partial, log, precision_flag="--save_precision")
    try:
        with atomic_path(out_dir, replace_folder=True) as tmp:
            # ComfyUI's diffusers loader opens one model.safetensors / diffusion_pytorch_model.safetensors
            # per component and reads no shard index; diffusers shards above 10 GB (SDXL's UNet in fp32)
            pipe.save_pretrained(str(tmp), max_shard_size="1000GB")
            _prefix_text_model_keys(pipe, tmp)
    except OSError as e:
        raise WriteError(f"could not write the merged pipeline next to {out_dir} ({e.strerror or e}); "
                         f"nothing at {out_dir} was changed") from None
    return out_dir


def merge_to_single_file(base: str | os.PathLike, adapter_path: str | os.PathLike, out_file: str | os.PathLike,
                         scale: float = 1.0, dtype: torch.dtype = torch.float16, allow_partial: bool = False,
                         log=print) -> Path:
    """Save one checkpoint in the original SD1.x / SDXL layout (single_file.py) with ΔW folded in:
    the file A1111, Forge and ComfyUI's checkpoint loader open.

    Same merge and refusals as merge_into_pipeline; `out_file` must end in .safetensors and may
    only replace an earlier checkpoint. Written beside `out_file` and renamed into place.
    """
    from .families import FAMILIES
    from .single_file import is_checkpoint, save_single_file

    out_file = Path(out_file)
    if out_file.suffix != ".safetensors":
        raise BadInput(f"--single_file {out_file}: give a .safetensors file name (nothing was written)")
    arch = read_adapter(adapter_path).metadata.get("base_arch", "sd")
    if arch in FAMILIES and FAMILIES[arch].denoiser != "unet":  # single_file.py knows SD1.x / SDXL layouts only
        raise BadInput(f"--single_file writes SD1.x / SDXL checkpoints only and {Path(adapter_path).name} is an "
                       f"{arch} adapter: merge into a folder with --out MERGED_DIR instead (nothing was written)")
    if out_file.exists() and not is_checkpoint(out_file):
        raise BadInput(f"--single_file {out_file} exists and is not an SD checkpoint; give a new file name "
                       f"(nothing was written)")
    pipe = merged_pipeline(base, adapter_path, scale, dtype, allow_partial, log, precision_flag="--dtype")
    meta = {"singlora_base": str(base), "singlora_adapter": Path(adapter_path).name, "singlora_scale": str(scale)}
    return save_single_file(pipe, out_file, meta)


def merged_pipeline(base: str | os.PathLike, adapter_path: str | os.PathLike, scale: float = 1.0,
                    dtype: torch.dtype = torch.float32, allow_partial: bool = False, log=print,
                    precision_flag: str = "--save_precision"):
    """The base pipeline in `dtype` with the adapter at `scale` folded in and the adapter layers gone.

    The adapter is read and checked before the (large) base loads. A merged weight that is not
    finite in `dtype` raises BadInput naming it.
    """
    from .adapters import set_strength
    from .format import load_adapter
    from .inject import remove_singlora, singlora_modules
    from .pipelines import load_pipeline, pipeline_components

    if not math.isfinite(scale):
        raise BadInput(f"--scale {scale}: expected a finite number")
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
                                 f"nothing was written: lower --scale or use {precision_flag} fp32")
    return pipe


def _prefix_text_model_keys(pipe, folder: Path) -> None:
    """Rewrite each saved CLIPTextModel file with its keys under `text_model.` (the hub's layout).

    transformers 5 saves a CLIPTextModel built or loaded without that level as bare
    `embeddings…` / `encoder…`, which ComfyUI's CLIP detection does not recognise ("clip
    missing"); transformers 5 itself loads either layout.
    """
    from safetensors.torch import load_file, save_file
    from transformers import CLIPTextModel

    from .single_file import with_text_model_prefix

    for name in ("text_encoder", "text_encoder_2"):
        if not isinstance(getattr(pipe, name, None), CLIPTextModel):
            continue  # CLIPTextModelWithProjection keeps text_model. as a real module level
        files = list((folder / name).glob("*.safetensors"))
        if len(files) != 1:
            raise RuntimeError(f"{folder / name}: expected one weights file, found {len(files)}")
        save_file(with_text_model_prefix(load_file(str(files[0]))), str(files[0]), metadata={"format": "pt"})
