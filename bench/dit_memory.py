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


def activations(model, family: str, resolution: int, tokens: int) -> int:
    """Peak activation bytes of one checkpointed forward + backward at batch 1, bf16."""
    c, bf16 = model.config, torch.bfloat16
    side = resolution // 8  # the VAE's factor
    d_text, pooled = c.joint_attention_dim, c.pooled_projection_dim
    text = torch.empty(1, tokens, d_text, device="meta", dtype=bf16)
    vector, step = torch.empty(1, pooled, device="meta", dtype=bf16), torch.empty(1, device="meta", dtype=bf16)
    if family == "sd3":
        x = torch.empty(1, c.in_channels, side, side, device="meta", dtype=bf16)
        kwargs = dict(hidden_states=x, encoder_hidden_states=text, pooled_projections=vector, timestep=step)
    else:
        n = (side // 2) ** 2
        x = torch.empty(1, n, c.in_channels, device="meta", dtype=bf16)
        kwargs = dict(hidden_states=x, encoder_hidden_states=text, pooled_projections=vector, timestep=step,
                      guidance=step, img_ids=torch.empty(n, 3, device="meta"), txt_ids=torch.empty(tokens, 3, device="meta"))

    def step_fn():
        model(**kwargs).sample.float().pow(2).mean().backward()
    real = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _fused_attention_memory
    try:
        return count_on_meta(step_fn, no_grad=False)[1]
    finally:
        torch.nn.functional.scaled_dot_product_attention = real


def rows(rank: int = 16) -> list[dict]:
    out = []
    for name, family, resolution, tokens in RUNS:
        sizes = {}
        for adapter in ("singlora", "lora"):
            model = meta_transformer(name).to(torch.bfloat16)
            inject_adapters({"transformer": model}, AdapterConfig(adapter=adapter, rank=rank, target_modules="attn"))
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            for p in model.parameters():
                if p.requires_grad:  # the adapters train in float32 (training/build.py)
                    p.data = p.data.float()
            model.enable_gradient_checkpointing()
            model.train()
            sizes[adapter] = (trainable, activations(model, family, resolution, tokens))
        weights = 2 * sum(p.numel() for p in meta_transformer(name).parameters())
        frozen = frozen_bytes(family)
        out.append(dict(base=name, resolution=resolution, transformer=weights, others=sum(frozen.values()),
                        t5=max(frozen.values()), **{f"{a}_params": n for a, (n, _) in sizes.items()},
                        **{f"{a}_activations": b for a, (_, b) in sizes.items()}))
    return out


def main() -> None:
    print("| base | px | transformer bf16 (GB) | VAE + text encoders bf16 (GB) | adapter | trainable | adapter + AdamW (GB) "
          "| activations, GC (GB) | total (GB) | without T5 resident (GB) |")
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    for r in rows():
        for a in ("singlora", "lora"):
            states = 16 * r[f"{a}_params"]
            total = r["transformer"] + r["others"] + states + r[f"{a}_activations"]
            print(f"| {r['base']} | {r['resolution']} | {r['transformer'] / GB:.1f} | {r['others'] / GB:.1f} | {a} | "
                  f"{r[f'{a}_params']:,} | {states / GB:.2f} | {r[f'{a}_activations'] / GB:.1f} | {total / GB:.1f} | "
                  f"{(total - r['t5']) / GB:.1f} |")


if __name__ == "__main__":
    main()
