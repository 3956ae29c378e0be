"""PEFT's LoRA and DoRA on exactly the layers SingLoRA would adapt, for fair comparisons."""
from __future__ import annotations

from torch import nn

from .targets import TargetSpec, find_targets

# --adapter -> PEFT's use_dora. LoRA+ is LoRA in the model and in every file written;
# only its optimizer differs (training/optim.py: B learns --loraplus_lr_ratio times faster).
PEFT_ADAPTERS = {"lora": False, "dora": True, "loraplus": False}


def inject_peft(model: nn.Module, targets: TargetSpec, rank: int, alpha: float | None = None,
                dora: bool = False, kind: str = "unet", seed: int | None = 0) -> list[str]:
    """Add a PEFT LoRA (or DoRA) adapter named "default"; only its weights train."""
    import torch
    from peft import LoraConfig, inject_adapter_in_model

    names = find_targets(model, targets, kind)
    config = LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, target_modules=names,
                        use_dora=dora, init_lora_weights=True)
    model.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):  # seed PEFT's kaiming init without touching the global RNG
        if seed is not None:
            torch.manual_seed(seed)
        inject_adapter_in_model(config, model, adapter_name="default")
    return names


def peft_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for name, p in model.named_parameters() if "lora_" in name]
