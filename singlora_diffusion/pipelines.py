"""Diffusion pipelines (SD1.x/2.x, SDXL, SD3/3.5, Flux.1): loading, their adaptable components,
injection by config."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .config import AdapterConfig
from .inject import inject_singlora
from .layer import check_rank
from .families import FAMILIES, denoiser_name, family_of, is_adaptable_text_encoder
from .targets import COMPONENT_KIND, find_targets
from .errors import BadInput, NotFound

COMPONENTS = tuple(COMPONENT_KIND)  # unet | transformer, text_encoder, text_encoder_2
# --mixed_precision / --save_precision names (accelerate's and diffusers' scripts') -> weight dtype
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PRECISIONS = tuple(DTYPES)
TINY_PREFIX, RANDOM_PREFIX = "tiny:", "random:"
TOY_BASE = "toy:shapes"  # the pretrained toy base shipped in the package (toy/base.py)
# --quantize_base -> (diffusers' PipelineQuantizationConfig backend, its settings): bitsandbytes'
# NF4 (QLoRA's 4-bit type, as diffusers' Flux quantization example trains on) and LLM.int8
QUANTIZATIONS = {"nf4": ("bitsandbytes_4bit", {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}),
                 "int8": ("bitsandbytes_8bit", {"load_in_8bit": True})}
QUANTIZE_CHOICES = ("none", *QUANTIZATIONS)


def pipeline_components(pipe) -> dict[str, nn.Module]:
    """The adaptable models of a pipeline, by the component names the file format uses: its
    denoiser and its CLIP text encoders (never T5: Flux's text_encoder_2, SD3's text_encoder_3)."""
    found = {c: getattr(pipe, c) for c in COMPONENTS if getattr(pipe, c, None) is not None}
    return {c: m for c, m in found.items() if COMPONENT_KIND[c] != "text_encoder" or is_adaptable_text_encoder(m)}


def denoiser(pipe) -> nn.Module:
    """The pipeline's UNet or transformer."""
    return getattr(pipe, denoiser_name(pipeline_components(pipe)))


def _latent_stats(vae_config, like: torch.Tensor):
    mean, std = getattr(vae_config, "latents_mean", None), getattr(vae_config, "latents_std", None)
    if mean is None or std is None:
        return None
    shape = (1, len(mean), 1, 1)
    return (torch.tensor(mean).view(shape).to(like.device, like.dtype),
            torch.tensor(std).view(shape).to(like.device, like.dtype))


def to_denoiser_latents(vae_config, z: torch.Tensor) -> torch.Tensor:
    """VAE latents (b, c, h, w) -> what the UNet or transformer is trained on.

    z·sf; (z − shift)·sf for VAEs whose config sets shift_factor (SD3's and Flux's 16-channel
    VAEs, as their DreamBooth scripts encode and pipelines decode); (z − mean)·sf/std for VAEs
    whose config carries latents_mean and latents_std (SDXL-family VAEs such as Playground's),
    as diffusers' SDXL DreamBooth script encodes and the SDXL pipeline decodes (from_denoiser_latents).
    """
    stats = _latent_stats(vae_config, z)
    if stats is None:
        return (z - (getattr(vae_config, "shift_factor", None) or 0.0)) * vae_config.scaling_factor
    mean, std = stats
    return (z - mean) * vae_config.scaling_factor / std


def from_denoiser_latents(vae_config, latents: torch.Tensor) -> torch.Tensor:
    """The inverse of to_denoiser_latents: what vae.decode takes."""
    stats = _latent_stats(vae_config, latents)
    if stats is None:
        return latents / vae_config.scaling_factor + (getattr(vae_config, "shift_factor", None) or 0.0)
    mean, std = stats
    return latents * std / vae_config.scaling_factor + mean


def inject_adapters(components: dict[str, nn.Module], cfg: AdapterConfig,
                    ramp_up_steps: int = 0) -> dict[str, list[str]]:
    """Add cfg.adapter to the denoiser (and to the CLIP text encoders if cfg names targets for them)."""
    from .baselines import PEFT_ADAPTERS, inject_peft

    denoiser = denoiser_name(components)
    plan = {denoiser: cfg.target_modules}
    if cfg.text_encoder_target_modules is not None:
        plan.update({c: cfg.text_encoder_target_modules for c in components if c != denoiser})
    for component, targets in plan.items():  # every layer checked before any adapter is built
        model = components[component]
        for name in find_targets(model, targets, COMPONENT_KIND[component]):
            layer = model.get_submodule(name)  # features, not weight.shape: a quantized weight is packed
            check_rank(cfg.rank, layer.in_features, layer.out_features, name)
    injected = {}
    for i, (component, targets) in enumerate(plan.items()):
        model, kind = components[component], COMPONENT_KIND[component]
        seed = cfg.init_seed + i  # each component its own stream, reproducible
        if cfg.adapter == "singlora":
            injected[component] = inject_singlora(model, targets, cfg.rank, cfg.alpha, ramp_up_steps, seed, kind)
        else:
            injected[component] = inject_peft(model, targets, cfg.rank, cfg.alpha, PEFT_ADAPTERS[cfg.adapter], kind,
                                              seed)
    return injected


def native_size(pipe) -> int:
    """The image side the pipeline renders by default (its own size): the denoiser's sample size in
    latents × the VAE's factor (FluxPipeline keeps it as default_sample_size; its transformer has none)."""
    sample = getattr(pipe, "default_sample_size", None) or denoiser(pipe).config.sample_size
    return int(sample) * pipe.vae_scale_factor


def side_multiple(pipe) -> int:
    """What every image side must be a multiple of: the VAE's factor, × 2 for the transformers, whose
    tokens are 2×2 latent patches (SD3's patch embedding; the latents Flux's pipeline packs)."""
    return pipe.vae_scale_factor * (2 if getattr(pipe, "transformer", None) is not None else 1)


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub itself reads it (1/ON/YES/TRUE, at its import)."""
    from huggingface_hub import constants

    return constants.is_offline_mode()


def _test_pipeline(name: str):
    """(kind, arch, save) for tiny:… / random:… / toy:shapes, None for any other base."""
    from .tiny import TINY_ARCHS, save_random_pipeline, save_tiny_pipeline

    if str(name) == TOY_BASE:
        from .toy.base import fingerprint, save_toy_pipeline

        # The folder is named by the shipped weights' fingerprint: a new toy base is a new folder.
        return "toy", f"shapes-{fingerprint()[:12]}", lambda out, _arch: save_toy_pipeline(out)
    if str(name).startswith("toy:"):
        raise BadInput(f"unknown toy pipeline {name!r}: the package ships {TOY_BASE}")
    builders = {TINY_PREFIX: ("tiny", save_tiny_pipeline), RANDOM_PREFIX: ("random", save_random_pipeline)}
    prefix = next((p for p in builders if str(name).startswith(p)), None)
    if prefix is None:
        return None
    kind, save = builders[prefix]
    arch = str(name)[len(prefix):]
    archs = TINY_ARCHS if kind == "tiny" else ("sd15", "sdxl")
    if arch not in archs:
        raise BadInput(f"unknown test pipeline {name!r}: choose {' or '.join(prefix + a for a in archs)}")
    return kind, arch, save


def cache_folder() -> Path:
    """Where built test pipelines and single-file config folders live (SINGLORA_CACHE)."""
    return Path(os.environ.get("SINGLORA_CACHE", Path.home() / ".cache" / "singlora_diffusion"))


def resolve_base(name: str | os.PathLike) -> str:
    """Offline test pipelines built once under the cache folder; any other name (a hub id, a
    diffusers folder, a single-file checkpoint) as given.

    tiny:sd15 / tiny:sdxl: ~10M parameters at 64 px; tiny:sd3 / tiny:flux: a few M at 32 px; random:sd15 / random:sdxl: the real
    component configs at full size (2 GB / 7 GB in fp16), random weights; toy:shapes: the
    pretrained toy base (32 px coloured shapes) shipped in the package.
    """
    test = _test_pipeline(name)
    if test is None:
        return str(name)
    kind, arch, save = test
    return str(save_pipeline_once(cache_folder() / f"{kind}-{arch}", lambda tmp: save(tmp, arch)))


def save_pipeline_once(folder: Path, save) -> Path:
    """save(tmp) writes a pipeline folder, once: built aside and renamed (never seen half-written);
    when another process finishes first, its folder is kept."""
    from .files import atomic_path

    if not (folder / "model_index.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            with atomic_path(folder) as tmp:
                save(tmp)
        except OSError:
            if not (folder / "model_index.json").is_file():
                raise  # not another process finishing first
    return folder


def check_base_exists(base: str | os.PathLike) -> None:
    """Fail fast, before anything heavy, when `base` is neither a folder, a cached hub id nor an
    SD checkpoint file (whose header alone is read: single_file.read_checkpoint)."""
    from .single_file import is_single_file, read_checkpoint

    if _test_pipeline(base) is not None:
        return  # built on first use
    if is_single_file(base):
        read_checkpoint(base)
        return
    path = Path(base)
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise NotFound(f"{path} is not a diffusers pipeline folder (no model_index.json); "
                                    f"pass a folder written by save_pretrained or a hub id")
        return
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(str(base))
    except HFValidationError:
        raise NotFound(f"base model {base}: no such folder, and not a hub id like "
                                f"'runwayml/stable-diffusion-v1-5'") from None
    if hub_offline():
        if not isinstance(try_to_load_from_cache(str(base), "model_index.json"), str):
            raise NotFound(f"base model {base!r} is not a local folder and not in the Hugging Face "
                                    f"cache, and HF_HUB_OFFLINE=1 forbids downloading it: download it once "
                                    f"online or pass a local diffusers folder")


def peek_family(base: str | os.PathLike):
    """The family of a base from its model_index.json alone (a folder, or a hub id in the cache),
    before any model loads; None when that file is not at hand (single-file checkpoints: SD only)."""
    import json

    from .single_file import is_single_file

    if is_single_file(base):
        return None
    path = Path(resolve_base(base)) / "model_index.json"
    if not path.is_file():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(str(base), "model_index.json")
        if not isinstance(cached, str):
            return None
        path = Path(cached)
    pipeline = json.loads(path.read_text()).get("_class_name")
    return next((f for f in FAMILIES.values() if f.pipeline == pipeline), None)


def check_quantization(quantize: str | None, base: str | os.PathLike) -> None:
    """--quantize_base's needs, said before any model loads: a CUDA GPU, bitsandbytes, a diffusers
    folder or hub id (diffusers quantizes while loading from_pretrained; from_single_file does not)."""
    from .errors import MissingDependency
    from .single_file import is_single_file

    if quantize in (None, "none"):
        return
    if quantize not in QUANTIZATIONS:
        raise BadInput(f"--quantize_base must be one of {', '.join(QUANTIZE_CHOICES)}, got {quantize!r}")
    if not torch.cuda.is_available():
        raise BadInput(f"--quantize_base {quantize} needs a CUDA GPU (bitsandbytes' kernels) and this machine has "
                       f"none: drop the flag (--mixed_precision bf16 and --gradient_checkpointing save memory "
                       f"on any device)")
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise MissingDependency(f"--quantize_base {quantize} needs bitsandbytes: pip install bitsandbytes")
    if is_single_file(base):
        raise BadInput(f"--quantize_base {quantize} quantizes while diffusers loads a folder; {base} is a single "
                       f"file: convert it first (singlora merge --out DIR of an adapter, or diffusers' "
                       f"from_single_file(...).save_pretrained(DIR)), or drop the flag")


def quantization_config(quantize: str, dtype: torch.dtype, family):
    """diffusers' PipelineQuantizationConfig for the frozen big models of `family`: its denoiser and T5.

    The CLIP encoders stay unquantized (they may train; they are small). Matmuls run in `dtype`.
    """
    from diffusers import PipelineQuantizationConfig

    backend, settings = QUANTIZATIONS[quantize]
    if quantize == "nf4":
        settings = {**settings, "bnb_4bit_compute_dtype": dtype}
    components = [family.denoiser] + ([family.t5] if family.t5 else [])
    return PipelineQuantizationConfig(quant_backend=backend, quant_kwargs=settings, components_to_quantize=components)


def inference_dtype(device: str | torch.device) -> torch.dtype:
    """fp16 on a GPU, as diffusers' examples render; float32 on a CPU, where fp16 kernels are slow."""
    return torch.float16 if str(device).startswith("cuda") else torch.float32


def compile_denoiser(model: nn.Module) -> str:
    """torch.compile a UNet / transformer in place, with whatever adapters it holds; says how.

    diffusers' regional compilation (ModelMixin.compile_repeated_blocks) compiles one block class
    the model names in `_repeated_blocks` (SD UNets: BasicTransformerBlock; Flux: its two block
    kinds) once and reuses the code for every instance: compile time is that of a block, not of
    the model. A model naming none (SD3's transformer, in diffusers 0.42) is compiled whole.
    In place (nn.Module.compile), so state-dict keys, checkpoints and adapter swaps see the same
    module tree; swapping an adapter recompiles at the next call.

    One code object serves every block, so each distinct variant of its inputs is a compiled
    graph of its own: block widths and token counts (until dynamo makes them dynamic), the first
    adapted block's input without grad, training vs. no_grad sampling, each strength. Past
    dynamo's default limit of 8 per code object it would run the block eagerly without a word,
    so the limit is raised (tests/test_compile.py checks that no call falls back).
    """
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    blocks = getattr(model, "_repeated_blocks", None)
    if blocks and hasattr(model, "compile_repeated_blocks"):
        model.compile_repeated_blocks()
        return f"regional ({', '.join(blocks)})"
    model.compile()
    return "whole model"


def load_pipeline(base: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | None = None,
                  vae_fp32_if_upcast: bool = False, quantize: str | None = None):
    """A diffusers text-to-image pipeline from a hub id, a local folder, a single-file checkpoint
    (A1111 / Civitai .safetensors; _load_single_file) or a test name (tiny:sd15), its weights in `dtype`.

    The dtype is always given to diffusers: without it an fp16 folder (the hub's fp16 variants,
    `singlora merge --save_precision fp16`) loads its text encoders in fp16 (transformers'
    default) beside a float32 UNet (diffusers'), and the first prompt fails on the dtype mismatch.

    vae_fp32_if_upcast: with an fp16 `dtype`, a VAE whose config sets force_upcast (SD1.5's
    and SDXL's: they overflow in fp16) is loaded in float32 from its own files instead.

    quantize: "nf4" | "int8" loads the denoiser and T5 quantized by bitsandbytes, on the GPU
    (check_quantization says what it needs; quantization_config what is quantized).
    """
    from diffusers import DiffusionPipeline

    from .single_file import is_single_file, read_checkpoint

    check_base_exists(base)
    check_quantization(quantize, base)
    if is_single_file(base):
        pipe = _load_single_file(read_checkpoint(base), dtype, vae_fp32_if_upcast)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device) if device else pipe
    base = resolve_base(base)
    try:
        extra = {}
        if quantize not in (None, "none"):
            family = peek_family(base)
            if family is None:
                raise BadInput(f"--quantize_base {quantize}: {base} has no model_index.json naming its pipeline")
            extra["quantization_config"] = quantization_config(quantize, dtype, family)
        pipe = DiffusionPipeline.from_pretrained(str(base), torch_dtype=dtype, **extra)
        if (vae_fp32_if_upcast and dtype == torch.float16 and getattr(pipe, "vae", None) is not None
                and getattr(pipe.vae.config, "force_upcast", False)):
            pipe.register_modules(vae=type(pipe.vae).from_pretrained(str(base), subfolder="vae",
                                                                   torch_dtype=torch.float32))
    except OSError as e:
        raise NotFound(f"could not load base model {base!r}: {e}") from e
    model = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if model is None:
        supported = ", ".join(f.pipeline for f in FAMILIES.values())
        raise BadInput(f"{base} is a {type(pipe).__name__}; SingLoRA supports {supported} (SD1.x/2.x, SDXL, "
                       f"SD3/3.5, Flux.1)")
    family_of(model)  # another transformer (PixArt, Sana, ...) is refused in one line
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if device else pipe


def _load_single_file(checkpoint, dtype: torch.dtype, vae_fp32_if_upcast: bool):
    """diffusers' from_single_file, offline: its `config=` is a folder built once under the cache
    from the checkpoint's configs (single_file.write_config_folder), so it never asks the hub."""
    import diffusers

    from .single_file import vae_state_dict, write_config_folder

    folder = save_pipeline_once(cache_folder() / "single-file-configs" / checkpoint.config_id,
                                lambda tmp: write_config_folder(tmp, checkpoint.configs))
    where = dict(config=str(folder), local_files_only=True)
    components = {}
    try:
        if vae_fp32_if_upcast and dtype == torch.float16 and checkpoint.configs["vae"].get("force_upcast", True):
            # as load_pipeline does for folders; built from the VAE's tensors alone, passed in so
            # the pipeline does not build an fp16 one first
            components["vae"] = diffusers.AutoencoderKL.from_single_file(
                vae_state_dict(checkpoint.path), subfolder="vae", torch_dtype=torch.float32, **where)
        return getattr(diffusers, checkpoint.pipeline_class).from_single_file(
            str(checkpoint.path), torch_dtype=dtype, **where, **components)
    except (ValueError, KeyError, RuntimeError) as e:  # diffusers' converters on weights that do not fit
        # diffusers' first sentence names the tensor and both shapes; its advice after it
        # (ignore_mismatched_sizes) does not apply here
        reason = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
        raise BadInput(f"{checkpoint.path}: its weights do not fit the {checkpoint.describe()} ({reason}); "
                       f"pass a full, unmodified SD1.x / SD2.x / SDXL checkpoint") from e
