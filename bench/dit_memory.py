"""Memory of SingLoRA DreamBooth on the full-size diffusion transformers, counted on the meta device.

    python -m bench.dit_memory        (the table in docs/benchmarks.md, "Memory at real size")

SD3.5-medium and FLUX.1-dev do not fit this machine's 24 GB (Flux's transformer alone is 23.8 GB
in bf16), so nothing is loaded: every model is built on the meta device from its real config and
  weights      = parameters × 2 bytes (bf16) of the transformer, the VAE and the text encoders;
  adapter      = trainable parameters × 16 bytes (float32 weight, gradient, AdamW's two moments);
  activations  = the peak bytes of tensors alive during one forward + backward of the transformer
                 with gradient checkpointing at batch 1 (webui.budget.count_on_meta). Attention is
                 replaced by a stand-in of the fused kernels' memory: O(tokens·width) and
                 differentiable in q, k and v, never the tokens² score matrix (checkpointing's
                 recompute runs outside torch's function modes, so the budget's own fused-attention
                 counter cannot be used here).
Text conditioning is one prompt: SD3 77 CLIP + 77 T5 tokens (max_sequence_length 77), Flux 512 T5
tokens. The CUDA allocator's fragmentation and the framework's workspace are not counted.
Three phases: encoding the prompts (every model resident, nothing trains yet), training after the
text encoders are freed (the default: embeddings cached), and training with them kept
(--cache_text_embeddings false, or a CLIP encoder training). A run's peak is its larger phase.
"""
from __future__ import annotations

import torch

from singlora_diffusion.config import AdapterConfig
from singlora_diffusion.pipelines import inject_adapters
from singlora_diffusion.reference_configs import DIT_TEXT_ENCODERS, DIT_VAE, meta_transformer
from singlora_diffusion.webui.budget import count_on_meta

GB = 1e9
# (transformer config, family, resolution, text tokens)
RUNS = [("sd35-medium", "sd3", 1024, 77 + 77), ("flux-dev", "flux", 1024, 512), ("flux-dev", "flux", 512, 512)]


def _meta(cls_name: str, config: dict):
    import diffusers
    import transformers

    with torch.device("meta"):
        if hasattr(diffusers, cls_name) and not hasattr(transformers, cls_name):
            return getattr(diffusers, cls_name)(**config)
        config_cls = transformers.T5Config if cls_name.startswith("T5") else transformers.CLIPTextConfig
        return getattr(transformers, cls_name)(config_cls(**config))


def frozen_bytes(family: str) -> dict[str, int]:
    """bf16 bytes of the frozen models besides the transformer."""
    models = {"vae": _meta("AutoencoderKL", DIT_VAE)}
    models.update({f"text encoder {i + 1}": _meta(c, cfg) for i, (c, cfg) in enumerate(DIT_TEXT_ENCODERS[family])})
    return {k: 2 * sum(p.numel() for p in m.parameters()) for k, m in models.items()}


def _fused_attention_memory(query, key, value, *args, **kwargs):
    """The shape and the dependencies of scaled_dot_product_attention, at a fused kernel's O(L·d) memory."""
    return query[..., : value.shape[-1]] + (key.mean(-2, keepdim=True) + value.mean(-2, keepdim=True))


def step_inputs(config, family: str, resolution: int, tokens: int, device) -> dict:
    """The transformer's keyword inputs for one bf16 sample at `resolution` with `tokens` text tokens."""
    bf16 = torch.bfloat16
    side = resolution // 8  # the VAE's factor
    text = torch.randn(1, tokens, config.joint_attention_dim, device=device, dtype=bf16)
    vector = torch.randn(1, config.pooled_projection_dim, device=device, dtype=bf16)
    step = torch.full((1,), 0.5, device=device, dtype=bf16)
    if family == "sd3":
        x = torch.randn(1, config.in_channels, side, side, device=device, dtype=bf16)
        return dict(hidden_states=x, encoder_hidden_states=text, pooled_projections=vector, timestep=1000 * step)
    n = (side // 2) ** 2  # Flux: 2×2 patches as tokens
    return dict(hidden_states=torch.randn(1, n, config.in_channels, device=device, dtype=bf16),
                encoder_hidden_states=text, pooled_projections=vector, timestep=step, guidance=step * 7,
                img_ids=torch.zeros(n, 3, device=device), txt_ids=torch.zeros(tokens, 3, device=device))


def with_adapter(model, adapter: str, rank: int) -> int:
    """Inject `adapter` on the attn preset as the trainer does (adapters float32, gradient
    checkpointing, train mode); the trainable parameter count."""
    inject_adapters({"transformer": model}, AdapterConfig(adapter=adapter, rank=rank, target_modules="attn"))
    for p in model.parameters():
        if p.requires_grad:  # the adapters train in float32 (training/build.py)
            p.data = p.data.float()
    model.enable_gradient_checkpointing()
    model.train()
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def activations(model, family: str, resolution: int, tokens: int) -> int:
    """Peak activation bytes of one checkpointed forward + backward at batch 1, bf16."""
    kwargs = step_inputs(model.config, family, resolution, tokens, "meta")

    def step_fn():
        model(**kwargs).sample.float().pow(2).mean().backward()
    real = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _fused_attention_memory
    try:
        return count_on_meta(step_fn, no_grad=False)[1]
    finally:
        torch.nn.functional.scaled_dot_product_attention = real


def measure(model, family: str, resolution: int, tokens: int, adapter: str, rank: int = 16, warmup: int = 2,
            steps: int = 5) -> dict:
    """The meta-device arithmetic checked on a real device (bench/gpu_check.py): `model` (bf16, random
    weights, on its device) trains its `adapter` with AdamW, under bf16 autocast as the trainer
    runs; steps/s over `steps` timed steps after `warmup`, and the peak memory (CUDA: max_memory_allocated;
    CPU: peak RSS) beside the predicted weights + adapter + AdamW + activations of the same model."""
    import time

    from bench.runs import rss_gb

    device = next(model.parameters()).device
    with torch.device("meta"):
        twin = type(model).from_config(model.config).to(torch.bfloat16)
    with_adapter(twin, adapter, rank)
    predicted = 2 * sum(p.numel() for p in model.parameters())
    trainable = with_adapter(model, adapter, rank)
    predicted += 16 * trainable + activations(twin, family, resolution, tokens)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    kwargs = step_inputs(model.config, family, resolution, tokens, device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    stamps = []
    for _ in range(warmup + steps):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(**kwargs).sample.float().pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        stamps.append(time.perf_counter())
    timed = stamps[warmup - 1:]
    return dict(trainable=trainable, steps_per_s=(len(timed) - 1) / (timed[-1] - timed[0]),
                memory_gb=torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else rss_gb(),
                memory_kind="cuda max_memory_allocated" if cuda else "peak RSS", predicted_gb=predicted / 2 ** 30)


def real_size_transformer(name: str, device: str):
    """A full-size SD3.5 / Flux.1 transformer with random weights, built in bf16 on `device`."""
    import diffusers

    from singlora_diffusion.reference_configs import TRANSFORMER_CONFIGS

    cls, config = TRANSFORMER_CONFIGS[name]
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # no float32 copy first (Flux: 48 GB)
    try:
        with torch.device(device):
            return getattr(diffusers, cls)(**config).requires_grad_(False)
    finally:
        torch.set_default_dtype(default)


def rows(rank: int = 16) -> list[dict]:
    out = []
    for name, family, resolution, tokens in RUNS:
        sizes = {}
        for adapter in ("singlora", "lora"):
            model = meta_transformer(name).to(torch.bfloat16)
            trainable = with_adapter(model, adapter, rank)
            sizes[adapter] = (trainable, activations(model, family, resolution, tokens))
        weights = 2 * sum(p.numel() for p in meta_transformer(name).parameters())
        frozen = frozen_bytes(family)
        out.append(dict(base=name, resolution=resolution, transformer=weights, others=sum(frozen.values()),
                        vae=frozen["vae"], **{f"{a}_params": n for a, (n, _) in sizes.items()},
                        **{f"{a}_activations": b for a, (_, b) in sizes.items()}))
    return out


def main() -> None:
    print("| base | px | transformer bf16 (GB) | VAE + text encoders bf16 (GB) | adapter | trainable | adapter + AdamW (GB) "
          "| activations, GC (GB) | encoding prompts (GB) | training, text encoders freed (GB) "
          "| training, text encoders kept (GB) |")
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows():
        for a in ("singlora", "lora"):
            states = 16 * r[f"{a}_params"]
            # before fit every model is resident and the adapter exists (float32), nothing trains yet
            encoding = r["transformer"] + r["others"] + 4 * r[f"{a}_params"]
            freed = r["transformer"] + r["vae"] + states + r[f"{a}_activations"]
            kept = freed + r["others"] - r["vae"]
            print(f"| {r['base']} | {r['resolution']} | {r['transformer'] / GB:.1f} | {r['others'] / GB:.1f} | {a} | "
                  f"{r[f'{a}_params']:,} | {states / GB:.2f} | {r[f'{a}_activations'] / GB:.1f} | {encoding / GB:.1f} | "
                  f"{freed / GB:.1f} | {kept / GB:.1f} |")


if __name__ == "__main__":
    main()
