"""Which Linear layers get an adapter: a table, not branches.

A target spec is a preset name from PRESETS[kind] or a list of patterns; a
pattern matches a module path when it is a dotted suffix of it ("to_q",
"attn2.to_k", "to_out.0") or a regular expression that fully matches it
(r"down_blocks\\.\\d+\\..*\\.to_q"). Only nn.Linear modules are ever targeted.
"""
from __future__ import annotations

import re
from typing import Sequence

from torch import nn
from .errors import BadInput

# kind -> preset -> patterns. "paper" is the paper's DreamBooth setup (Sec. 6.2:
# UNet to_q, to_k); "attn" is every attention projection, as diffusers'
# train_dreambooth_lora.py adapts.
PRESETS: dict[str, dict[str, tuple[str, ...]]] = {
    "unet": {
        "paper": ("to_q", "to_k"),
        "attn": ("to_q", "to_k", "to_v", "to_out.0"),
    },
    "text_encoder": {
        "attn": ("q_proj", "k_proj", "v_proj", "out_proj"),
    },
}

# pipeline component -> kind of model it is (both SDXL text encoders are CLIP).
COMPONENT_KIND = {"unet": "unet", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder"}

TargetSpec = str | Sequence[str]


def resolve_patterns(spec: TargetSpec, kind: str) -> tuple[str, ...]:
    """Turn a preset name, a comma-separated string or a list into patterns."""
    presets = PRESETS[kind]
    if isinstance(spec, str):
        if spec in presets:
            return presets[spec]
        if "," not in spec:
            raise BadInput(
                f"unknown {kind} target preset {spec!r}: presets are {', '.join(sorted(presets))}; "
                f"to name modules, pass a comma-separated list such as '{','.join(presets[sorted(presets)[0]])}'")
        spec = [s.strip() for s in spec.split(",") if s.strip()]
    patterns = tuple(spec)
    if not patterns:
        raise BadInput(f"empty {kind} target list: give a preset ({', '.join(sorted(presets))}) or module names")
    return patterns


def _matches(name: str, pattern: str) -> bool:
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def find_targets(model: nn.Module, spec: TargetSpec, kind: str) -> list[str]:
    """Paths of the nn.Linear modules of `model` matched by `spec`, in model order."""
    patterns = resolve_patterns(spec, kind)
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    found = [name for name in linears if any(_matches(name, p) for p in patterns)]
    if not found:
        examples = ", ".join(linears[:4])
        raise BadInput(f"target patterns {list(patterns)} match no nn.Linear in the {kind}; "
                         f"its Linear layers are named like: {examples}")
    return found


def base_arch(unet) -> str:
    """"sdxl" or "sd", from the UNet itself (an adapter may live on the UNet alone).

    SDXL's UNet (base and refiner) takes the pooled-text + size/crop "text_time" embedding.
    """
    return "sdxl" if getattr(unet.config, "addition_embed_type", None) == "text_time" else "sd"


def base_model_version(unet) -> str:
    """kohya's ss_base_model_version: sdxl_base_v1-0, sd_v2 (OpenCLIP-H, 1024-wide context) or sd_v1.

    A1111 lists an SDXL LoRA under SDXL models only when this starts with "sdxl_".
    """
    if base_arch(unet) == "sdxl":
        return "sdxl_base_v1-0"
    return "sd_v2" if unet.config.cross_attention_dim == 1024 else "sd_v1"
