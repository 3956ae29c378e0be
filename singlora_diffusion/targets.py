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
_DIT_ATTN = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
PRESETS: dict[str, dict[str, tuple[str, ...]]] = {
    "unet": {
        "paper": ("to_q", "to_k"),
        "attn": ("to_q", "to_k", "to_v", "to_out.0"),
    },
    # SD3/3.5 and Flux.1 (MMDiT): one table serves both, the patterns match each family's own layers.
    # "attn" is diffusers' train_dreambooth_lora_sd3.py default (image stream to_*, text stream add_*,
    # SD3.5-medium's second image attention attn2 included); in Flux it also takes the single
    # blocks' to_q/to_k/to_v, which have no to_out. "paper": the query and key projections of both
    # streams, the paper's q,k choice carried over. "all": attention plus the feed-forward layers of
    # both streams, and Flux single blocks' MLP in (proj_mlp) and fused out (proj_out; the
    # model's final proj_out is not an attention block's and stays frozen).
    "transformer": {
        "paper": ("to_q", "to_k", "add_q_proj", "add_k_proj"),
        "attn": _DIT_ATTN,
        "all": _DIT_ATTN + ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp",
                            r"single_transformer_blocks\.\d+\.proj_out"),
    },
    "text_encoder": {
        "attn": ("q_proj", "k_proj", "v_proj", "out_proj"),
    },
}

# pipeline component -> kind of model it is. A text_encoder_2 is a CLIP tower in SDXL and SD3
# (adapted), T5 in Flux (never adapted: pipelines.pipeline_components leaves it out).
COMPONENT_KIND = {"unet": "unet", "transformer": "transformer", "text_encoder": "text_encoder",
                  "text_encoder_2": "text_encoder"}
DENOISER_KINDS = ("unet", "transformer")

TargetSpec = str | Sequence[str]


def resolve_patterns(spec: TargetSpec, kind: str) -> tuple[str, ...]:
    """Turn a preset name, a comma-separated string or a list into patterns."""
    presets = PRESETS[kind]
    if isinstance(spec, str):
        if spec in presets:
            return presets[spec]
        if "," not in spec:
            others = [k for k in DENOISER_KINDS if k != kind and spec in PRESETS[k]] if kind in DENOISER_KINDS else []
            which = f" ({spec!r} is a preset of {others[0]} models: SD3/3.5 and Flux.1)" if others else ""
            raise BadInput(
                f"unknown {kind} target preset {spec!r}{which}: presets are {', '.join(sorted(presets))}; "
                f"to name modules, pass a comma-separated list such as '{','.join(presets[sorted(presets)[0]])}'")
        spec = [s.strip() for s in spec.split(",") if s.strip()]
    patterns = tuple(spec)
    if not patterns:
        raise BadInput(f"empty {kind} target list: give a preset ({', '.join(sorted(presets))}) or module names")
    return patterns


def check_denoiser_spec(spec: TargetSpec) -> None:
    """Before the base is known: `spec` is a list, or a preset of the UNet or of the transformers."""
    if isinstance(spec, str) and "," not in spec and not any(spec in PRESETS[k] for k in DENOISER_KINDS):
        names = sorted({p for k in DENOISER_KINDS for p in PRESETS[k]})
        raise BadInput(f"unknown target preset {spec!r}: presets are {', '.join(names)} ('all' for SD3/3.5 and "
                       f"Flux.1 only); to name modules, pass a comma-separated list such as 'to_q,to_k'")
    if not isinstance(spec, str):
        resolve_patterns(spec, "unet")  # an empty list


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
