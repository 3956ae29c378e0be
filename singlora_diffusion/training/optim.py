"""What updates the adapter: its parameter groups, the optimizer, and the EMA of its weights.

    param_groups     one group per adapted component: the UNet's adapters at --learning_rate, each text
                     encoder's at --text_encoder_lr (default: --learning_rate). With --adapter loraplus,
                     PEFT's create_loraplus_optimizer splits each group: B at --loraplus_lr_ratio x the
                     group's rate, A at it (LoRA+, Hayou et al. 2024, §3: ηB = λ·ηA)
    make_optimizer   torch AdamW | bitsandbytes AdamW8bit | prodigyopt Prodigy over those groups
    AdapterEMA       diffusers' EMAModel over the same tensors: one update per optimizer step taken;
                     validation and the final files use its weights, checkpoints keep both

The SingLoRA ramp u(t) is not here: inject.attach_ramp hooks whichever optimizer this
module returns, so it counts optimizer steps under each of them.
"""
from __future__ import annotations

import importlib.util
from contextlib import contextmanager
import torch

from ..families import DENOISERS
from ..errors import BadInput, MissingDependency
from .build import Trainee
from .config import TrainConfig

# optimizer -> (the package it needs, how to install it)
PACKAGES = {"adamw8bit": ("bitsandbytes", "pip install bitsandbytes (CUDA GPUs only)"),
            "prodigy": ("prodigyopt", "pip install 'singlora-diffusion[prodigy]' (or pip install prodigyopt)")}


def missing_package(optimizer: str) -> str | None:
    """How to install what `optimizer` needs when it is not installed; None when it can run."""
    package, install = PACKAGES.get(optimizer, (None, None))
    return install if package and importlib.util.find_spec(package) is None else None


def check_optimizer(cfg: TrainConfig) -> None:
    """The optimizer flags' packages and contradictions, before any model loads (training.validate)."""
    install = missing_package(cfg.optimizer)
    if install:
        flag = "--use_8bit_adam" if cfg.use_8bit_adam else f"--optimizer {cfg.optimizer}"
        raise MissingDependency(f"{flag} needs {PACKAGES[cfg.optimizer][0]}: {install}, or use --optimizer adamw")
    if cfg.optimizer == "prodigy":
        # Prodigy estimates one step size d for all parameters; a group's lr only scales d,
        # and prodigyopt refuses groups whose lr differ (RuntimeError at the first step).
        if cfg.adapter == "loraplus":
            raise BadInput("--adapter loraplus and --optimizer prodigy contradict each other: Prodigy takes one "
                           "learning rate for all parameters, LoRA+ gives B --loraplus_lr_ratio times A's; use "
                           "--optimizer adamw (or adamw8bit) with loraplus, or --adapter lora with prodigy")
        if cfg.text_encoder_lr is not None and cfg.text_encoder_lr != cfg.learning_rate:
            raise BadInput(f"--text_encoder_lr {cfg.text_encoder_lr:g} and --optimizer prodigy contradict each other: "
                           f"Prodigy takes one learning rate for all parameters (--learning_rate "
                           f"{cfg.learning_rate:g}); drop --text_encoder_lr")
    if cfg.text_encoder_lr is not None and cfg.text_encoder_target_modules is None:
        raise BadInput(f"--text_encoder_lr {cfg.text_encoder_lr:g} is set but the text encoders do not train: add "
                       f"--train_text_encoder (or --text_encoder_target_modules), or drop --text_encoder_lr")


def component_lr(cfg: TrainConfig, component: str) -> float:
    if component in DENOISERS or cfg.text_encoder_lr is None:
        return cfg.learning_rate
    return cfg.text_encoder_lr


def param_groups(cfg: TrainConfig, trainee: Trainee) -> list[dict]:
    """The optimizer's groups, each named ("unet", "text_encoder.lora_B", ...) for logs and tests."""
    groups = []
    for component, model in trainee.trained.items():
        params, lr = trainee.parameters_of(component), component_lr(cfg, component)
        if cfg.adapter != "loraplus":
            groups.append({"params": params, "lr": lr, "name": component})
            continue
        split = loraplus_groups(model, lr, cfg.loraplus_lr_ratio, cfg.adam_weight_decay)
        if {id(p) for g in split.values() for p in g["params"]} != set(map(id, params)):
            raise RuntimeError(f"LoRA+ grouped other tensors of {component} than the adapter's: the {component} "
                               f"has trainable parameters outside its LoRA layers")
        groups += [dict(g, name=f"{component}.{part}") for part, g in split.items()]
    return groups


def loraplus_groups(model: torch.nn.Module, lr: float, ratio: float, weight_decay: float) -> dict[str, dict]:
    """PEFT's LoRA+ grouping of one model's trainable tensors, without its optimizer.

    create_loraplus_optimizer builds an optimizer per model; a run has one optimizer over
    the UNet and the text encoders (each at its own lr), so its groups are taken from a
    stand-in optimizer class. Its weight decay is set to AdamW's: LoRA+ then differs from
    --adapter lora in B's learning rate only (PEFT's default decay is 0).
    """
    from peft.optimizers import create_loraplus_optimizer

    class GroupsOnly:
        def __init__(self, groups, **_):
            self.groups = groups

    groups = create_loraplus_optimizer(model, GroupsOnly, lr=lr, loraplus_lr_ratio=ratio,
                                       loraplus_weight_decay=weight_decay).groups
    # PEFT's order: A, embeddings, B, B without decay; the empty ones are dropped
    names = ("lora_A", "lora_embedding", "lora_B", "lora_B_no_decay")
    return {name: g for name, g in zip(names, groups) if g["params"]}


def make_optimizer(cfg: TrainConfig, groups: list[dict]) -> torch.optim.Optimizer:
    if cfg.optimizer == "prodigy":
        from prodigyopt import Prodigy

        # diffusers' DreamBooth scripts pass Adam's betas, epsilon and decay to Prodigy too
        return Prodigy(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                       weight_decay=cfg.adam_weight_decay, d_coef=cfg.prodigy_d_coef,
                       safeguard_warmup=cfg.prodigy_safeguard_warmup,
                       use_bias_correction=cfg.prodigy_use_bias_correction)
    kwargs = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay,
                  eps=cfg.adam_epsilon)
    if cfg.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, **kwargs)
    # foreach: one multi-tensor update over the many small adapter tensors (torch picks it on CUDA
    # only; it pays on the CPU too: docs/benchmarks.md). fused: one kernel per dtype and device.
    impl = dict(fused=True) if cfg.fused_adamw else dict(foreach=True)
    return torch.optim.AdamW(groups, **impl, **kwargs)


class AdapterEMA:
    """diffusers' EMAModel over the adapter's trainable tensors (float32, on their device).

    Its decay at the n-th update is min(--ema_decay, n / (9 + n)), 0 at the first: the
    average starts at the weights after step 1 instead of the initial ones. The SingLoRA
    ramp step is a buffer, not averaged: u(t) follows the live step count.
    """

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        from diffusers.training_utils import EMAModel

        self.params = params
        self.model = EMAModel(params, decay=decay, foreach=True)

    def update(self) -> None:
        self.model.step(self.params)

    @contextmanager
    def weights_in_use(self):
        """The EMA weights in the model for the block's duration; the live ones come back after."""
        self.model.store(self.params)
        self.model.copy_to(self.params)
        try:
            yield
        finally:
            self.model.restore(self.params)

    def copy_to_model(self) -> None:
        """For good: the model the run returns (and writes) carries the EMA weights."""
        self.model.copy_to(self.params)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """A checkpoint's EMA; the decay stays this run's --ema_decay (reconcile_resume says if it changed)."""
        decay, device = self.model.decay, self.params[0].device
        shadow = state["shadow_params"]
        if len(shadow) != len(self.params) or any(s.shape != p.shape for s, p in zip(shadow, self.params)):
            raise BadInput(f"the checkpoint's EMA state holds {len(shadow)} tensors that do not match the adapter's "
                           f"{len(self.params)}; was it written with other --adapter/--rank/--target_modules?")
        self.model.load_state_dict(state)
        self.model.to(device=device)
        self.model.decay = decay

