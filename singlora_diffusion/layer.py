"""SingLoRA: low-rank adaptation with a single matrix (arXiv 2507.05566).

The math only: this file knows nothing about UNets, text encoders or files.

           x ──────────► W0 (frozen) ─────────────┐
           │                                      ▼
           └─► A[:d_in]ᵀ (r×d_in) ─► A[:d_out] ─► (α/r)·u(t)·scale ─► (+) ─► y
                  "down"                 "up"

    W = W0 + (α/r) · u(t) · A[:d_out] · A[:d_in]ᵀ        (paper Eq. 1 / Sec. 4.4)

with W0 in PyTorch's (d_out, d_in) layout, n = max(d_in, d_out), A ∈ R^{n×r}.
For a square layer this is the paper's A·Aᵀ; for a non-square one it is the
Sec. 4.4 truncation written for y = x·Wᵀ (the paper writes y = x·W, and
copying its slices literally into PyTorch's layout crashes on d_out ≠ d_in).

`lowrank_factors` is the one place the update is defined; `delta_weight`,
the forward pass, merge/unmerge and the export to standard LoRA all use it.
"""
from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch import nn
from torch.nn import functional as F
from .errors import BadInput

ADAPTER_PREFIX = "singlora_"  # every adapter tensor's name starts with this (see inject.py)


def ramp(step: torch.Tensor | int, ramp_up_steps: int) -> torch.Tensor:
    """u(t) = min(t / T, 1), t = completed optimizer steps (paper Sec. 4.1).

    1. T = 0 means "no ramp": the full update from the first step.
    2. Otherwise u grows linearly from 0 at t = 0 to 1 at t = T and stays there.
    Written on tensors so a step counter living on the GPU never forces a sync.
    """
    step = torch.as_tensor(step, dtype=torch.float32)
    if ramp_up_steps <= 0:
        return torch.ones_like(step)
    return (step / ramp_up_steps).clamp(max=1.0)


def init_singlora_A(n: int, rank: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A (n, r) float32 with entries Θ(n^-1/2): Kaiming-uniform with fan = n.

    PyTorch's default for an (n, r) tensor uses fan_in = r, giving entries of
    size r^-1/2 and ‖A·Aᵀ‖₂ ≈ n/(3r) (≈ 53 at n = 1280, r = 8), which blows up
    training. With fan = n, AᵀA ≈ I/3, so ‖ΔW‖₂ = O(1) as the paper assumes.
    """
    bound = 1.0 / math.sqrt(n)  # = gain(a=√5)·√(3/fan) with fan = n, as nn.Linear uses
    A = torch.empty(n, rank, dtype=torch.float32)
    return A.uniform_(-bound, bound, generator=generator)


def lowrank_factors(A: torch.Tensor, d_out: int, d_in: int, coef: torch.Tensor | float):
    """The SingLoRA update as an exact LoRA pair: ΔW = up @ down.

    up = coef · A[:d_out]  (d_out, r),   down = A[:d_in]ᵀ  (r, d_in),
    coef = (α/r) · u(t) · scale. Export to diffusers/kohya LoRA writes these.
    """
    # A slice covering all of A would still add a SliceBackward (and a zeroed
    # (n, r) gradient buffer) per layer and step; square layers skip it.
    rows = lambda d: A if d == A.shape[0] else A[:d]
    # coef = 1 (alpha = r, u = 1, scale 1: the trainer's default once the ramp is over) needs no
    # multiply, forward or backward; `up` is then a view of A.
    up = rows(d_out) if isinstance(coef, (int, float)) and coef == 1 else rows(d_out) * coef
    return up, rows(d_in).t()


def delta_weight(A: torch.Tensor, d_out: int, d_in: int, coef: torch.Tensor | float) -> torch.Tensor:
    """ΔW (d_out, d_in) in A's dtype (float32)."""
    up, down = lowrank_factors(A, d_out, d_in, coef)
    return up @ down


def check_rank(rank: int, d_in: int, d_out: int, name: str = "") -> None:
    """1 <= rank <= min(d_in, d_out): A[:d_in] and A[:d_out] must both have `rank` columns of
    independent rows for the update to have rank r (and LoRA's B·A the same for the baselines)."""
    if not 1 <= rank <= min(d_in, d_out):
        where = f"layer {name} " if name else "a "
        raise BadInput(f"--rank {rank} is larger than {where}(Linear({d_in} -> {d_out})) allows "
                       f"({min(d_in, d_out)}); choose --rank <= {min(d_in, d_out)}" if rank >= 1 else
                       f"--rank {rank}: expected a whole number >= 1")


class SingLoRALinear(nn.Module):
    """Wraps a frozen nn.Linear; adds (α/r)·u(t)·scale·A[:d_out]·A[:d_in]ᵀ.

    The original layer is kept untouched as `base_layer`, so unloading puts it
    back exactly. The ramp step is a buffer: it is saved with the weights and
    advanced only by `advance_step()` (called once per optimizer step, see
    inject.attach_ramp), never by forward calls — forward counts are wrong
    under gradient accumulation and gradient checkpointing.
    """

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float | None = None,
                 ramp_up_steps: int = 0, generator: torch.Generator | None = None):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"SingLoRA wraps nn.Linear layers, got {type(base_layer).__name__}")
        # the features, not weight.shape: a quantized base's weight is packed (bitsandbytes' Linear4bit
        # holds 4-bit pairs in a (d_out·d_in/2, 1) tensor)
        d_out, d_in = base_layer.out_features, base_layer.in_features
        n = max(d_in, d_out)
        check_rank(rank, d_in, d_out)
        self.base_layer = base_layer
        self.rank, self.alpha = rank, float(rank if alpha is None else alpha)
        self.ramp_up_steps = int(ramp_up_steps)
        self.d_in, self.d_out = d_in, d_out
        self._scale = 1.0  # inference-time strength; see the `scale` property
        self.merged_coef: float | None = None  # coef folded into base_layer.weight, if merged
        # A is float32 whatever the base dtype: in bf16 an AdamW update of ~lr
        # on entries of ~n^-1/2 rounds to zero while u(t) is small.
        A = init_singlora_A(n, rank, generator).to(base_layer.weight.device)
        self.singlora_A = nn.Parameter(A)
        self.register_buffer("singlora_step", torch.zeros((), dtype=torch.long,
                                                          device=base_layer.weight.device))
        # The host's copy of "u(t) = 1 now": once the ramp is over, forward needs no ramp tensor
        # work (five tiny ops per layer and call). Kept beside the buffer by advance_step,
        # set_step and load_state_dict, so deciding it never reads a GPU tensor per call (None:
        # not known, learnt from the buffer at the next advance_step). torch.compile never reads it
        # (see coef). Move the step with set_step, not by writing the buffer.
        self._host_step: int | None = 0
        self._ramp_done = self.ramp_up_steps <= 0

    # nn.Linear's attributes, for code that inspects attn.to_q.weight etc.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.d_in

    @property
    def out_features(self) -> int:
        return self.d_out

    @property
    def scale(self) -> float:
        """Inference-time strength multiplying the update (inject.set_scale sets it model-wide)."""
        return self._scale

    @scale.setter
    def scale(self, value: float) -> None:
        value = float(value)
        if self.merged_coef is not None and value != self._scale:
            # A merged layer's output comes from base_layer.weight alone: fold the
            # update in again at the new strength, or the new value would be ignored.
            self.unmerge()
            self._scale = value
            self.merge()
        else:
            self._scale = value

    def coef(self, scale: float | None = None) -> torch.Tensor | float:
        """(α/r) · u(t) · scale: a float once the ramp is over, else a float32 0-d tensor on A's device."""
        scale = self.scale if scale is None else scale
        # Compiled, the tensor path costs nothing (its ops fuse into one kernel), and not reading
        # _ramp_done there spares the compiled blocks a guard and a recompile when the ramp ends.
        if not torch.compiler.is_compiling() and self._ramp_done:
            return self.alpha / self.rank * scale
        u = ramp(self.singlora_step, self.ramp_up_steps).to(self.singlora_A.device)
        return u * (self.alpha / self.rank) * scale

    def delta_weight(self, scale: float | None = None) -> torch.Tensor:
        return delta_weight(self.singlora_A, self.d_out, self.d_in, self.coef(scale))

    def advance_step(self, n: int = 1) -> None:
        self.singlora_step += n
        if not self._ramp_done:
            # One read of the buffer after a set_step / load, then counted on the host.
            self._host_step = (int(self.singlora_step) if self._host_step is None else self._host_step + n)
            self._ramp_done = self._host_step >= self.ramp_up_steps

    def set_step(self, step: int) -> None:
        self.singlora_step.fill_(step)
        self._host_step = int(step)
        self._ramp_done = self.ramp_up_steps <= 0 or self._host_step >= self.ramp_up_steps

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        # The loaded step is only on the tensor: learn it from there (one read, here, not per call).
        self.set_step(int(self.singlora_step))

    def forward(self, x: torch.Tensor, *args, scale: float | None = None, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.merged_coef is not None:
            if scale is not None and scale != self._scale:
                raise RuntimeError(f"this layer is merged at scale {self._scale:g}; set layer.scale = {scale:g} "
                                   f"(which re-merges) or unmerge() before calling it with another scale")
            return out
        # The adapter path runs in float32 even inside autocast (which would
        # otherwise run these matmuls in bf16/fp16); its output is cast back. The meta device (memory
        # counted without memory, bench/dit_memory.py) has no autocast to turn off.
        off = x.device.type != "meta" and torch.is_autocast_enabled(x.device.type)
        with torch.autocast(device_type=x.device.type, enabled=False) if off else nullcontext():
            A = self.singlora_A.to(torch.float32)  # no copy: A is float32 (see __init__)
            up, down = lowrank_factors(A, self.d_out, self.d_in, self.coef(scale))
            # x·ΔWᵀ as two thin matmuls: O(tokens·n·r), never the full d_out×d_in ΔW.
            delta = F.linear(F.linear(x.to(torch.float32), down), up)
        return out + delta.to(out.dtype)

    @torch.no_grad()
    def merge(self, scale: float | None = None) -> None:
        """Fold ΔW into base_layer.weight (at `scale`, which becomes self.scale, if given).

        Merging an already merged layer again at its own scale does nothing; at
        another scale it re-merges (see the `scale` setter).
        """
        if scale is not None and float(scale) != self._scale:
            self.scale = scale  # re-merges if merged; otherwise only records it
        if self.merged_coef is not None:
            return
        coef = self.coef()
        W = self.base_layer.weight
        if tuple(W.shape) != (self.d_out, self.d_in) or not W.dtype.is_floating_point:
            raise BadInput(f"cannot merge into a quantized layer (its weight is {W.dtype} {tuple(W.shape)}, "
                           f"not a ({self.d_out}, {self.d_in}) float matrix): merge into the unquantized base "
                           f"(singlora merge loads it without --quantize_base)")
        W.copy_((W.to(torch.float32) + delta_weight(self.singlora_A, self.d_out, self.d_in, coef)).to(W.dtype))
        self.merged_coef = float(coef)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the ΔW merged earlier (exact up to the base dtype's rounding). No-op if not merged.

        Uses A as it is now: train nothing between merge and unmerge.
        """
        if self.merged_coef is None:
            return
        W = self.base_layer.weight
        dW = delta_weight(self.singlora_A, self.d_out, self.d_in, self.merged_coef)
        W.copy_((W.to(torch.float32) - dW).to(W.dtype))
        self.merged_coef = None

    def _apply(self, fn, recurse=True):
        # Keep A in float32 when the model is cast (pipe.to(torch.bfloat16),
        # .half()): move it to the requested device only. Casting it down
        # would silently lose the small early updates (see __init__).
        # Its gradient stays float32 too: AdamW (and GradScaler's unscale) would
        # otherwise read a bf16/fp16 gradient of a float32 parameter.
        original = self.singlora_A.detach()  # keeps the float32 storage alive
        grad = None if self.singlora_A.grad is None else self.singlora_A.grad.detach()
        device = fn(original[:0]).device
        result = super()._apply(fn, recurse)
        if self.singlora_A.dtype != torch.float32:
            self.singlora_A.data = original.to(device=device)
        if grad is not None and self.singlora_A.grad is not None and self.singlora_A.grad.dtype != torch.float32:
            self.singlora_A.grad = grad.to(device=device)
        return result

    def extra_repr(self) -> str:
        return (f"d_in={self.d_in}, d_out={self.d_out}, rank={self.rank}, alpha={self.alpha:g}, "
                f"ramp_up_steps={self.ramp_up_steps}, merged={self.merged_coef is not None}")
