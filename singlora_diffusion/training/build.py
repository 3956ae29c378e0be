"""Phase 1-2 of training: check the inputs (before any model loads), then build the models."""
from __future__ import annotations

import importlib.util
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..baselines import peft_parameters
from ..inject import singlora_parameters
from ..pipelines import check_base_exists, inject_adapters, load_pipeline, pipeline_components
from ..targets import COMPONENT_KIND, find_targets, resolve_patterns
from .config import TrainConfig
from ..errors import BadInput, MissingDependency, NotWritable

TINY_PREFIX, RANDOM_PREFIX = "tiny:", "random:"
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_base(name: str) -> str:
    """Offline test pipelines built once under the cache folder; any other name as given.

    tiny:sd15 / tiny:sdxl: ~10M parameters at 64 px; random:sd15 / random:sdxl: the real
    component configs at full size (2 GB / 7 GB in fp16), random weights.
    """
    from ..tiny import save_random_pipeline, save_tiny_pipeline

    builders = {TINY_PREFIX: ("tiny", save_tiny_pipeline), RANDOM_PREFIX: ("random", save_random_pipeline)}
    prefix = next((p for p in builders if name.startswith(p)), None)
    if prefix is None:
        return name
    kind, save = builders[prefix]
    arch = name[len(prefix):]
    if arch not in ("sd15", "sdxl"):
        raise BadInput(f"unknown test pipeline {name!r}: choose {prefix}sd15 or {prefix}sdxl")
    cache = Path(os.environ.get("SINGLORA_CACHE", Path.home() / ".cache" / "singlora_diffusion"))
    folder = cache / f"{kind}-{arch}"
    if not (folder / "model_index.json").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache))  # built aside, then renamed: never seen half-written
        save(tmp, arch)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)


def check_output_dir(path: str | Path) -> None:
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as e:
        raise NotWritable(f"--output_dir {path} is not writable ({e.strerror}); choose another folder") from None


@dataclass
class Inputs:
    """What validation found: usable image files and the resolved base."""
    base: str
    instance_images: list[Path]
    class_images: list[Path] = field(default_factory=list)


def validate(cfg: TrainConfig) -> Inputs:
    """Every check that needs no model: images, output folder, base, presets. Raises one clear error."""
    from .data import check_sizes, scan_images

    images = scan_images(cfg.instance_data_dir, role="instance")
    check_sizes(images, cfg.resolution)
    check_output_dir(cfg.output_dir)
    resolve_patterns(cfg.target_modules, "unet")
    base = resolve_base(cfg.pretrained_model_name_or_path)
    check_base_exists(base)
    class_images: list[Path] = []
    if cfg.with_prior_preservation:
        Path(cfg.class_data_dir).mkdir(parents=True, exist_ok=True)
        try:
            class_images = scan_images(cfg.class_data_dir, role="class")
        except ValueError:
            class_images = []  # none yet: they will be generated
    if cfg.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise MissingDependency("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes (CUDA GPUs only), "
                          "or drop the flag")
    return Inputs(base, images, class_images)


def check_rank_fits(model: nn.Module, cfg: TrainConfig, kind: str, targets) -> None:
    """A rank larger than a target layer is refused before any adapter is built."""
    layers = {name: model.get_submodule(name) for name in find_targets(model, targets, kind)}
    for name, layer in layers.items():
        d_out, d_in = layer.weight.shape
        if cfg.rank > min(d_in, d_out):
            raise BadInput(f"--rank {cfg.rank} is larger than layer {name} (Linear({d_in} -> {d_out})) allows "
                             f"({min(d_in, d_out)}); choose --rank <= {min(d_in, d_out)}")


@dataclass
class Trainee:
    pipe: object
    components: dict[str, nn.Module]
    trained: dict[str, nn.Module]          # the components that carry adapters
    weight_dtype: torch.dtype
    ramp_up_steps: int
    adapter: str = "singlora"

    def parameters(self) -> list[nn.Parameter]:
        pick = singlora_parameters if self.adapter == "singlora" else peft_parameters
        return [p for model in self.trained.values() for p in pick(model)]

    def named_parameters(self) -> dict[str, nn.Parameter]:
        """"component.param_name" -> adapter parameter, a stable key for checkpoints."""
        wanted = set(map(id, self.parameters()))
        return {f"{c}.{n}": p for c, model in self.trained.items()
                for n, p in model.named_parameters() if id(p) in wanted}


def build(cfg: TrainConfig, inputs: Inputs, device: torch.device) -> Trainee:
    """Load the base, freeze it in the training dtype, add adapters (kept in float32)."""
    weight_dtype = DTYPES[cfg.mixed_precision]
    # The frozen base is loaded straight in the training dtype: an SDXL loaded in float32
    # first would need 14 GB of RAM before it is cast (and a VAE cast fp32 -> fp16 -> fp32
    # would round its weights).
    pipe = load_pipeline(inputs.base, dtype=weight_dtype, vae_fp32_if_upcast=True)
    components = pipeline_components(pipe)
    plan = {"unet": cfg.target_modules}
    if cfg.train_text_encoder:
        plan.update({c: cfg.text_encoder_target_modules for c in components if c != "unet"})
    for component, targets in plan.items():
        check_rank_fits(components[component], cfg, COMPONENT_KIND[component], targets)
    adapter_cfg = cfg if cfg.train_text_encoder else _unet_only(cfg)
    ramp_up_steps = cfg.resolved_ramp_up_steps(cfg.max_train_steps)
    for model in [pipe.vae, *components.values()]:
        model.requires_grad_(False)
    inject_adapters(components, adapter_cfg, ramp_up_steps)
    pipe.to(device)  # device only: the dtypes are as loaded (SingLoRA's A is float32 by construction)
    trained = {c: components[c] for c in plan}
    trainee = Trainee(pipe, components, trained, weight_dtype, ramp_up_steps, cfg.adapter)
    for p in trainee.parameters():
        p.data = p.data.float()  # PEFT creates its LoRA weights in the base layer's dtype
    if cfg.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
        if cfg.train_text_encoder:
            for c in plan:
                if c != "unet":
                    components[c].gradient_checkpointing_enable()
    return trainee


def _unet_only(cfg: TrainConfig):
    import dataclasses

    from ..config import AdapterConfig

    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(AdapterConfig)}
    return AdapterConfig(**{**fields, "text_encoder_target_modules": None})
