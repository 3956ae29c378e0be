"""What a generate request will cost, counted before any work is done, and the limits it must fit.

The loaded UNet (or SD3 / Flux transformer) and VAE are rebuilt from their configs on the meta device (shapes
only: no memory, no arithmetic) and run once at the requested size. That counts the
FLOPs of one denoising step and one VAE decode and the peak bytes of activations
alive at once, for this model at this size: attention's quadratic growth and the
VAE's full-resolution layers (what made 2048x2048 x 8 images take 20 GB) included.
The request costs steps x UNet step + images x decode (the engine decodes one
image at a time). The device's speed is measured once with a matmul; the limits
are an estimated time and the memory free on the device.
"""
from __future__ import annotations

import time
import weakref
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from .requests import BadRequest

# A whole diffusion step runs below a plain matmul's speed (convolutions, norms,
# memory-bound element-wise ops): the measured speed is scaled by this.
EFFICIENCY = 0.4  # measured: tiny SD1.5, 64-512 px on 2 CPU cores ran 1.1-1.3x the 0.5 estimate
MEMORY_SHARE = 0.7  # of the memory free when the request arrives


@dataclass(frozen=True)
class Cost:
    flops: float       # the whole request
    peak_bytes: int    # activations alive at once, the largest of a UNet step and a decode


@dataclass(frozen=True)
class Limits:
    device: str
    flops_per_second: float   # measured, times EFFICIENCY
    max_seconds: float
    free_bytes: int

    def seconds(self, cost: Cost) -> float:
        return cost.flops / self.flops_per_second


class _LiveBytes(TorchDispatchMode):
    """Peak bytes of tensors alive at once; a view shares its base's memory and is not counted."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not any(r.alias_info is not None for r in func._schema.returns):
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    n = t.numel() * t.element_size()
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(t, self._free, n)
        return out

    def _free(self, n: int) -> None:
        self.live -= n


class _FusedAttention(TorchFunctionMode):
    """scaled_dot_product_attention as the fused kernels run it on CPU and GPU: O(L) memory, not L².

    On the meta device it would decompose into the math path and count an L x L
    score matrix that the real run never holds; its FLOPs are counted here instead.
    """

    def __init__(self):
        super().__init__()
        self.flops = 0.0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            # positional (diffusers' UNet processors) or by name (its attention dispatcher: SD3, Flux)
            named = dict(zip(("query", "key", "value"), args[:3]), **kwargs)
            q, k, v = named["query"], named["key"], named["value"]
            batch = q.shape[:-2].numel()
            self.flops += 2 * 2 * batch * q.shape[-2] * k.shape[-2] * q.shape[-1]  # QKᵀ and PV
            return q.new_empty((*q.shape[:-1], v.shape[-1]))
        return func(*args, **kwargs)


def count_on_meta(fn, no_grad: bool = True) -> tuple[float, int]:
    """(FLOPs, peak bytes of the tensors fn creates and holds at once) of fn() on meta tensors, with
    attention counted as the fused kernels run it. Also what bench/dit_memory.py measures training with."""
    from torch.utils.flop_counter import FlopCounterMode

    counter, live, fused = FlopCounterMode(display=False), _LiveBytes(), _FusedAttention()
    with torch.no_grad() if no_grad else nullcontext(), fused, counter, live:
        fn()
    return counter.get_total_flops() + fused.flops, live.peak


# text tokens the pipelines render with by default: CLIP's 77, SD3's 77 + 256 T5 tokens, Flux's 512 T5 tokens
_TEXT_TOKENS = {"sd": 77, "sdxl": 77, "sd3": 77 + 256, "flux": 512}


def _empty(*shape, like):
    return torch.empty(*shape, device="meta", dtype=like.dtype)


def _unet_step(u, batch: int, h: int, w: int):
    x, text = _empty(batch, u.config.in_channels, h, w, like=u), _empty(batch, 77, u.config.cross_attention_dim, like=u)
    extra = {}
    if u.config.addition_embed_type == "text_time":  # SDXL: pooled text embedding and the six size/crop numbers
        time_dim = 6 * u.config.addition_time_embed_dim
        pooled = u.config.projection_class_embeddings_input_dim - time_dim
        extra = {"added_cond_kwargs": {"text_embeds": _empty(batch, pooled, like=u), "time_ids": _empty(batch, 6, like=u)}}
    return lambda: u(x, torch.tensor(10, device="meta"), text, **extra)


def _sd3_step(t, batch: int, h: int, w: int):
    c = t.config
    x, text = _empty(batch, c.in_channels, h, w, like=t), _empty(batch, _TEXT_TOKENS["sd3"], c.joint_attention_dim, like=t)
    pooled, step = _empty(batch, c.pooled_projection_dim, like=t), _empty(batch, like=t)
    return lambda: t(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled, timestep=step)


def _flux_step(t, batch: int, h: int, w: int):
    c, tokens, words = t.config, (h // 2) * (w // 2), _TEXT_TOKENS["flux"]
    x, text = _empty(batch, tokens, c.in_channels, like=t), _empty(batch, words, c.joint_attention_dim, like=t)
    pooled, step = _empty(batch, c.pooled_projection_dim, like=t), _empty(batch, like=t)
    guidance = _empty(batch, like=t) if c.guidance_embeds else None
    return lambda: t(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled, timestep=step,
                     guidance=guidance, img_ids=_empty(tokens, 3, like=t), txt_ids=_empty(words, 3, like=t))


# family -> one denoising step's forward on the meta device, and whether guidance > 1 doubles the batch
# (Flux.1's guidance is an input of the distilled model, not a second pass)
_STEP = {"sd": (_unet_step, True), "sdxl": (_unet_step, True), "sd3": (_sd3_step, True), "flux": (_flux_step, False)}


class CostModel:
    """Meta-device copies of a pipeline's denoiser (UNet or transformer) and VAE; cost(...) per
    request, cached by shape."""

    def __init__(self, pipe):
        import logging

        from diffusers.utils import logging as diffusers_logging

        from ..families import family_of
        from ..pipelines import denoiser

        model, vae = denoiser(pipe), pipe.vae
        level = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity(logging.ERROR)  # from_config + .to(dtype) warns about fp32 modules
        try:
            with torch.device("meta"):
                self.denoiser = type(model).from_config(model.config).to(model.dtype)
                self.vae = type(vae).from_config(vae.config).to(vae.dtype)
        finally:
            diffusers_logging.set_verbosity(level)
        self.scale = pipe.vae_scale_factor
        self.step_of, self.cfg_doubles = _STEP[family_of(model).arch]
        self._cache: dict[tuple, tuple[float, int, float, int]] = {}

    def _decode(self, h: int, w: int):
        v = self.vae
        z = torch.empty(1, v.config.latent_channels, h, w, device="meta", dtype=v.dtype)
        return lambda: v.decode(z)

    def cost(self, width: int, height: int, num_images: int, steps: int, guidance: float) -> Cost:
        h, w = height // self.scale, width // self.scale
        batch = num_images * (2 if guidance > 1 and self.cfg_doubles else 1)  # classifier-free guidance: 2 passes
        key = (h, w, batch)
        if key not in self._cache:
            self._cache[key] = (*count_on_meta(self.step_of(self.denoiser, batch, h, w)), *count_on_meta(self._decode(h, w)))
        step_flops, step_bytes, decode_flops, decode_bytes = self._cache[key]
        return Cost(steps * step_flops + num_images * decode_flops, max(step_bytes, decode_bytes))


def measure_speed(device: str, dtype: torch.dtype, seconds: float = 0.2) -> float:
    """FLOP/s of a square matmul on `device` in `dtype` (the model's), timed for about `seconds`."""
    n = 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    a @ b  # warm-up
    sync()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        done += 1
        sync()
    return 2 * n ** 3 * done / (time.perf_counter() - start)


def free_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    import psutil

    return psutil.virtual_memory().available


def check(cost: Cost, limits: Limits) -> None:
    """Refuse a request that would run longer than the limit or not fit in memory; one line naming both."""
    seconds = limits.seconds(cost)
    if seconds > limits.max_seconds:
        raise BadRequest(f"This request needs about {cost.flops / 1e12:.1f} TFLOP, ~{seconds:.0f} s on this "
                         f"{limits.device}; the limit is {limits.max_seconds:.0f} s per request. Lower the size, the "
                         f"steps or the number of images.")
    if cost.peak_bytes > MEMORY_SHARE * limits.free_bytes:
        raise BadRequest(f"This request needs about {cost.peak_bytes / 2**30:.1f} GB of {limits.device} memory at "
                         f"once; {MEMORY_SHARE * limits.free_bytes / 2**30:.1f} GB can be spared now. Lower the size "
                         f"or the number of images.")
