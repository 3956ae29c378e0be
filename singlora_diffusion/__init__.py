"""singlora-diffusion: DreamBooth personalisation of Stable Diffusion with SingLoRA adapters."""
from .adapters import adapters_off, set_strength
from .config import AdapterConfig
from .inject import (advance_step, attach_ramp, get_step, inject_singlora, mark_only_singlora_trainable,
                     merge_singlora, remove_singlora, set_scale, set_step, singlora_modules, singlora_parameters,
                     unmerge_singlora)
from .layer import SingLoRALinear, delta_weight, init_singlora_A, lowrank_factors, ramp

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig", "SingLoRALinear", "adapters_off", "advance_step", "attach_ramp", "delta_weight", "get_step",
    "init_singlora_A", "inject_singlora", "lowrank_factors", "mark_only_singlora_trainable", "merge_singlora",
    "ramp", "remove_singlora", "set_scale", "set_step", "set_strength", "singlora_modules", "singlora_parameters", "unmerge_singlora",
]
