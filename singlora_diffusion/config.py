"""The adapter's settings: one dataclass; CLI flags and YAML map onto it."""
from __future__ import annotations

from dataclasses import dataclass, field

from .targets import PRESETS, TargetSpec, check_denoiser_spec, resolve_patterns
from .errors import BadInput

ADAPTERS = ("singlora", "lora", "dora", "loraplus")


@dataclass
class AdapterConfig:
    adapter: str = field(default="singlora", metadata={
        "help": "singlora, or PEFT's lora / dora / loraplus (LoRA+: B learns --loraplus_lr_ratio times "
                "faster) as baselines on the same targets and rank"})
    rank: int = field(default=8, metadata={"help": "r: columns of A (SingLoRA) or rank of B·A (LoRA)"})
    alpha: float | None = field(default=None, metadata={
        "help": "α; the update is scaled by α/r. Default: α = r (scale 1)"})
    ramp_up_steps: int | None = field(default=None, metadata={
        "help": "T of the ramp u(t)=min(t/T,1) in optimizer steps; 0 = no ramp. "
                "Default: 1%% of the training steps, at least 1 (the paper's choice)"})
    target_modules: TargetSpec = field(default="attn", metadata={
        "help": "denoiser layers: preset 'attn' (UNet: to_q,to_k,to_v,to_out.0; SD3/Flux transformer: those and "
                "add_q_proj,add_k_proj,add_v_proj,to_add_out), 'paper' (the query and key projections), 'all' "
                "(SD3/Flux: attention and feed-forward) or a comma-separated list of module-name suffixes / regexes"})
    text_encoder_target_modules: TargetSpec | None = field(default=None, metadata={
        "help": "text-encoder layers (preset 'attn' = q_proj,k_proj,v_proj,out_proj, or a list); "
                "unset = text encoders are not adapted"})
    init_seed: int = field(default=0, metadata={"help": "seed of the initialisation of A"})

    def __post_init__(self):
        if self.adapter not in ADAPTERS:
            raise BadInput(f"adapter must be one of {', '.join(ADAPTERS)}, got {self.adapter!r}")
        if int(self.rank) < 1:
            raise BadInput(f"rank must be >= 1, got {self.rank}")
        self.rank = int(self.rank)
        self.alpha = float(self.rank if self.alpha is None else self.alpha)
        if self.ramp_up_steps is not None and int(self.ramp_up_steps) < 0:
            raise BadInput(f"ramp_up_steps must be >= 0 (0 = no ramp), got {self.ramp_up_steps}")
        # Fail on an unknown preset now, before any model is loaded.
        check_denoiser_spec(self.target_modules)
        if self.text_encoder_target_modules is not None:
            resolve_patterns(self.text_encoder_target_modules, "text_encoder")

    def resolved_ramp_up_steps(self, total_steps: int | None) -> int:
        """T: as given, else 1 % of the training steps (at least 1); 0 when not training."""
        if self.ramp_up_steps is not None:
            return int(self.ramp_up_steps)
        return max(1, round(0.01 * total_steps)) if total_steps else 0


__all__ = ["AdapterConfig", "ADAPTERS", "PRESETS"]
