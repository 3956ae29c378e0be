"""Model surgery: put SingLoRALinear wrappers on target layers and take them off.

Every adapter tensor is named with layer.ADAPTER_PREFIX, so freezing, the
optimizer and saving find them without parsing names by position.
"""
from __future__ import annotations


import torch
from torch import nn

from .layer import ADAPTER_PREFIX, SingLoRALinear
from .targets import TargetSpec, find_targets


def singlora_modules(model: nn.Module) -> dict[str, SingLoRALinear]:
    """name -> wrapper, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SingLoRALinear)}


def inject_singlora(model: nn.Module, targets: TargetSpec, rank: int, alpha: float | None = None,
                    ramp_up_steps: int = 0, seed: int | None = 0, kind: str = "unet") -> list[str]:
    """Wrap the target Linear layers of `model`; freeze everything else.

    Not idempotent on purpose: a second call raises instead of stacking a
    second adapter on the first. Returns the wrapped module paths.
    """
    if singlora_modules(model):
        raise RuntimeError(f"this {kind} already has SingLoRA adapters; call remove_singlora() "
                           f"first to replace them")
    names = find_targets(model, targets, kind)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    model.requires_grad_(False)
    for name in names:
        model.set_submodule(name, SingLoRALinear(model.get_submodule(name), rank, alpha,
                                                   ramp_up_steps, generator))
    return names


def remove_singlora(model: nn.Module, merge: bool = False) -> None:
    """Put the original Linear layers back.

    merge=False restores them exactly as they were (unmerging first if needed);
    merge=True keeps ΔW folded into their weights (for export as a full model).
    """
    for name, m in singlora_modules(model).items():
        m.merge() if merge else m.unmerge()
        model.set_submodule(name, m.base_layer)


def merge_singlora(model: nn.Module, scale: float | None = None) -> None:
    """Fold ΔW into the base weights; safe to call twice."""
    for m in singlora_modules(model).values():
        m.merge(scale)


def unmerge_singlora(model: nn.Module) -> None:
    for m in singlora_modules(model).values():
        m.unmerge()


def singlora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for name, p in model.named_parameters() if name.rpartition(".")[2].startswith(ADAPTER_PREFIX)]


def mark_only_singlora_trainable(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(name.rpartition(".")[2].startswith(ADAPTER_PREFIX))


def set_scale(model: nn.Module, scale: float) -> None:
    for m in singlora_modules(model).values():
        m.scale = float(scale)


def get_step(model: nn.Module) -> int:
    steps = {int(m.singlora_step) for m in singlora_modules(model).values()}
    if len(steps) > 1:
        raise RuntimeError(f"SingLoRA layers disagree on the ramp step: {sorted(steps)}")
    return steps.pop() if steps else 0


def set_step(model: nn.Module, step: int) -> None:
    for m in singlora_modules(model).values():
        m.set_step(step)


def advance_step(model: nn.Module, n: int = 1) -> None:
    for m in singlora_modules(model).values():
        m.advance_step(n)


def attach_ramp(optimizer: torch.optim.Optimizer, *models: nn.Module):
    """Advance the ramp of `models` after each step the optimizer really takes.

    A post-step hook on the (inner) torch optimizer fires once per optimizer
    step: not per forward call, not on micro-batches that only accumulate
    gradients (accelerate skips the inner step then), not when a GradScaler
    skips a step on inf/NaN gradients. Returns the hook handle.
    """
    modules = [m for model in models for m in singlora_modules(model).values()]
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps one

    def _advance(*_):
        for m in modules:
            m.advance_step()
    return inner.register_step_post_hook(_advance)
