"""Phase 1-2 of training: check the inputs (before any model loads), then build the models."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..baselines import peft_parameters
from ..families import DENOISERS, Family, denoiser_name, family_of
from ..errors import BadInput
from ..files import check_writable
from ..images import ImageFolderError, scan_images
from ..inject import singlora_parameters
from ..pipelines import DTYPES, check_quantization, compile_denoiser, peek_family, side_multiple, check_base_exists, inject_adapters, load_pipeline, pipeline_components, resolve_base
from ..targets import check_denoiser_spec
from .batches import PromptEncoder, release_text_encoders, run_prompts
from .config import TrainConfig
from .objective import check_objective_flags
from .dataset import Concept, Item, load_concepts, training_items


@dataclass
class Inputs:
    """What validation found: the resolved base, the concepts and what trains on them."""
    base: str
    concepts: list[Concept]
    items: list[Item]                       # every image (and repeat) with its prompt and size
    class_images: list[list[Path]] = field(default_factory=list)  # per concept (prior preservation)


def _flag(cfg: TrainConfig, c: int, key: str) -> str:
    """How a message names a concept's setting: the flag, or the concepts file's entry."""
    return f"--concepts_list {cfg.concepts_list}, concept {c + 1}, {key}" if cfg.concepts_list else f"--{key}"


def _captions(folder: str, extension: str | None) -> tuple[str, ...]:
    """The caption files in `folder`: they belong there, and are not skipped images."""
    if not extension or not Path(folder).is_dir():
        return ()
    return tuple(p.name for p in Path(folder).iterdir() if p.suffix.lower() == extension.lower())


def validate(cfg: TrainConfig) -> Inputs:
    """Every check that needs no model: images, captions, output folder, base, presets. Raises one clear error."""
    from .optim import check_optimizer

    concepts = load_concepts(cfg)
    images = [scan_images(c.instance_data_dir, _flag(cfg, i, "instance_data_dir"), "instance images",
                          ignore=_captions(c.instance_data_dir, cfg.caption_extension))
              for i, c in enumerate(concepts)]
    items = training_items(cfg, concepts, images)
    check_writable(cfg.output_dir, "--output_dir")
    check_denoiser_spec(cfg.target_modules)
    base = resolve_base(cfg.pretrained_model_name_or_path)
    check_base_exists(base)
    check_quantization(cfg.quantize_base, base)  # a GPU and bitsandbytes, said before the base loads
    family = peek_family(base)
    if family is not None:  # a DDPM flag on a flow-matching base (or back), said before the base loads
        check_objective_flags(cfg, family)
    class_images: list[list[Path]] = []
    if cfg.with_prior_preservation:
        for i, concept in enumerate(concepts):
            Path(concept.class_data_dir).mkdir(parents=True, exist_ok=True)
            try:
                class_images.append(scan_images(concept.class_data_dir, _flag(cfg, i, "class_data_dir"),
                                                "class images"))
            except ImageFolderError:
                class_images.append([])  # none yet: they will be generated
    if cfg.dataloader_num_workers:
        # said, not silently dropped: a user of diffusers' scripts expects worker processes
        warnings.warn(f"--dataloader_num_workers {cfg.dataloader_num_workers} is ignored: this trainer has no "
                      f"DataLoader (the photos are decoded in the main process)", UserWarning, stacklevel=2)
    check_optimizer(cfg)  # bitsandbytes / prodigyopt installed, no contradicting optimizer flags
    return Inputs(base, concepts, items, class_images)


@dataclass
class Trainee:
    pipe: object
    components: dict[str, nn.Module]
    trained: dict[str, nn.Module]          # the components that carry adapters
    weight_dtype: torch.dtype
    ramp_up_steps: int
    adapter: str = "singlora"
    prompts: object = None                 # batches.PromptEncoder: every prompt's conditioning (build sets it)
    compiled: str | None = None            # how --compile compiled the denoiser (pipelines.compile_denoiser)

    @property
    def denoiser_name(self) -> str:
        """"unet" or "transformer"."""
        return denoiser_name(self.components)

    @property
    def denoiser(self) -> nn.Module:
        return self.components[self.denoiser_name]

    @property
    def family(self) -> Family:
        return family_of(self.denoiser)

    @property
    def trains_text_encoders(self) -> bool:
        return any(c not in DENOISERS for c in self.trained)

    def parameters(self) -> list[nn.Parameter]:
        return [p for component in self.trained for p in self.parameters_of(component)]

    def parameters_of(self, component: str) -> list[nn.Parameter]:
        """One component's adapter tensors (the optimizer gives each component its own group)."""
        pick = singlora_parameters if self.adapter == "singlora" else peft_parameters
        return pick(self.trained[component])

    def named_parameters(self) -> dict[str, nn.Parameter]:
        """"component.param_name" -> adapter parameter, a stable key for checkpoints."""
        wanted = set(map(id, self.parameters()))
        return {f"{c}.{n}": p for c, model in self.trained.items()
                for n, p in model.named_parameters() if id(p) in wanted}


def build(cfg: TrainConfig, inputs: Inputs, device: torch.device) -> Trainee:
    """Load the base, freeze it in the training dtype, add adapters (kept in float32)."""
    from diffusers.training_utils import cast_training_params

    weight_dtype = DTYPES[cfg.mixed_precision]
    # The frozen base is loaded straight in the training dtype: an SDXL loaded in float32
    # first would need 14 GB of RAM before it is cast (and a VAE cast fp32 -> fp16 -> fp32
    # would round its weights).
    pipe = load_pipeline(inputs.base, dtype=weight_dtype, vae_fp32_if_upcast=True, quantize=cfg.quantize_base)
    components = pipeline_components(pipe)
    ramp_up_steps = cfg.resolved_ramp_up_steps(cfg.max_train_steps)
    # every model of the pipeline, T5 too (it is not among the adaptable components): a T5 left
    # requiring grad would keep its activations for a backward that never uses them
    for model in pipe.components.values():
        if isinstance(model, nn.Module):
            model.requires_grad_(False)
    # One decision of what trains: the core adapts the UNet, and the text encoders when
    # cfg.text_encoder_target_modules is set (TrainConfig.__post_init__ resolves the flags).
    # It checks --rank against every target layer before it builds any adapter.
    check_resolution(cfg, pipe)
    injected = inject_adapters(components, cfg, ramp_up_steps)
    trained = {c: components[c] for c in injected}
    pipe.to(device)  # device only: the dtypes are as loaded
    # Adapter weights train in float32 under any base dtype: SingLoRA's A is float32 by
    # construction, PEFT creates its LoRA/DoRA weights in the base layer's dtype. Only the
    # adapters require grad (the base is frozen above), so only they are cast.
    cast_training_params(list(trained.values()), dtype=torch.float32)
    if cfg.gradient_checkpointing:
        for c, model in trained.items():  # diffusers and transformers name the switch differently
            (model.enable_gradient_checkpointing if c in DENOISERS else model.gradient_checkpointing_enable)()
    denoiser = components[denoiser_name(components)]
    if cfg.channels_last:
        denoiser.to(memory_format=torch.channels_last)  # only 4-D tensors change: the UNet's convolutions
    # After the adapters and checkpointing, before accelerate.prepare: the blocks compile with
    # the adapter layers inside, and DDP wraps the compiled model as it is.
    compiled = compile_denoiser(denoiser) if cfg.compile else None
    trainee = Trainee(pipe, components, trained, weight_dtype, ramp_up_steps, cfg.adapter, compiled=compiled)
    trainee.prompts = PromptEncoder(pipe, cfg.cache_text_embeddings and not trainee.trains_text_encoders,
                                    cfg.max_sequence_length)
    return trainee


def encode_prompts_once(cfg: TrainConfig, trainee: Trainee, inputs: Inputs) -> list[str]:
    """When the text embeddings are cached, encode every prompt the run needs now and free the text
    encoders (T5 included): the names freed, none when a text encoder trains or with
    --cache_text_embeddings false. After any class-image generation, which renders with them."""
    prompts = trainee.prompts
    if not prompts.cache_enabled:
        return []
    prompts.prepare(*run_prompts(cfg, inputs.concepts, inputs.items))
    freed = release_text_encoders(trainee.pipe)
    prompts.released = True
    for name in freed:
        trainee.components.pop(name, None)
    return freed


def check_resolution(cfg: TrainConfig, pipe) -> None:
    """The transformers cut latents into patches (2×2 in SD3 and Flux): every side must divide."""
    if getattr(pipe, "transformer", None) is None:
        return  # UNets: the config's multiple of 8 is the VAE's factor
    factor = side_multiple(pipe)
    sides = {cfg.resolution} | ({cfg.min_bucket_reso, cfg.max_bucket_reso, cfg.bucket_reso_steps}
                                if cfg.enable_bucket else set())
    bad = sorted(s for s in sides if s % factor)
    if bad:
        raise BadInput(f"{type(pipe).__name__} needs image sides that are multiples of {factor} (the VAE's factor "
                       f"{pipe.vae_scale_factor} × the transformer's 2×2 patches); {bad[0]} is not: change "
                       f"--resolution (and the --*_bucket_reso settings)")

