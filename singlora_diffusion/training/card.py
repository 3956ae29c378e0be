"""The model card README.md and the sample grid written beside a trained adapter."""
from __future__ import annotations

from pathlib import Path

from ..files import write_text
from .build import Trainee
from .config import TrainConfig


def optimizer_line(cfg: TrainConfig) -> str:
    """The optimizer, LoRA+ ratio, text-encoder rate and EMA, as the card's settings line says them."""
    parts = [f"optimizer {cfg.optimizer}"]
    if cfg.optimizer == "prodigy":
        parts[0] += (f" (d_coef {cfg.prodigy_d_coef:g}, safeguard_warmup {cfg.prodigy_safeguard_warmup}, "
                     f"use_bias_correction {cfg.prodigy_use_bias_correction})")
    if cfg.adapter == "loraplus":
        parts.append(f"LoRA+: B's learning rate {cfg.loraplus_lr_ratio:g} x A's")
    if cfg.text_encoder_lr is not None:
        parts.append(f"text-encoder learning rate {cfg.text_encoder_lr:g}")
    parts.append(f"EMA of the weights (decay {cfg.ema_decay:g}): the files hold the average" if cfg.use_ema
                 else "no EMA")
    return ", ".join(parts)


def write_model_card(cfg: TrainConfig, trainee: Trainee, output_dir: Path, weights: dict[str, Path]) -> dict:
    """README.md + samples.png: the base model (top row) and the adapted one (bottom), same seeds.

    weights: what write_final wrote ("adapter", "diffusers", "kohya"); the card says which file goes where.
    """
    from diffusers.utils import make_image_grid

    from ..adapters import adapters_off
    from ..generate import render

    prompt = cfg.validation_prompt or cfg.instance_prompt
    for m in trainee.trained.values():
        m.eval()
    settings = dict(seed=cfg.seed, steps=cfg.validation_inference_steps, num_images=cfg.num_validation_images,
                    width=cfg.resolution, height=cfg.resolution)
    with adapters_off(trainee.pipe):
        before = render(trainee.pipe, prompt, **settings)
    after = render(trainee.pipe, prompt, **settings)
    grid_path = output_dir / "samples.png"
    make_image_grid(before + after, rows=2, cols=len(before)).save(grid_path)
    uses = []
    if "kohya" in weights:
        uses.append(f"| ComfyUI, A1111, Forge | copy `{weights['kohya'].name}` to `models/loras/` |")
    else:  # why: training/weights.py
        uses.append(f"| ComfyUI, A1111, Forge | no kohya file is written for {cfg.adapter} baseline runs |")
    uses.append(f"| diffusers | `pipe.load_lora_weights(\"{output_dir}\")` reads `{weights['diffusers'].name}` |")
    if "adapter" in weights:
        uses.append(f"| singlora CLI, web UI | `singlora generate --adapter {weights['adapter']}`, or pick "
                    f"`{weights['adapter'].name}` in the web UI |")
    uses = "\n".join(uses)
    text = f"""---
base_model: {cfg.pretrained_model_name_or_path}
instance_prompt: {cfg.instance_prompt}
tags: [stable-diffusion, dreambooth, {cfg.adapter}, singlora-diffusion]
---
# {cfg.adapter} DreamBooth adapter

Trained with singlora-diffusion `train_dreambooth.py` on
`{cfg.pretrained_model_name_or_path}` for {cfg.max_train_steps} steps.

- instance prompt: `{cfg.instance_prompt}`
- adapter: {cfg.adapter}, rank {cfg.rank}, alpha {cfg.alpha:g}, targets `{cfg.target_modules}`
  {"" if cfg.text_encoder_target_modules is None else f"(text encoders: `{cfg.text_encoder_target_modules}`)"}
- {optimizer_line(cfg)}
- learning rate {cfg.learning_rate:g} ({cfg.lr_scheduler}), batch {cfg.train_batch_size} x
  {cfg.gradient_accumulation_steps}, resolution {cfg.resolution}, precision {cfg.mixed_precision}, seed {cfg.seed}
- full settings: `config.yaml`

## Use

| use in | how |
|---|---|
{uses}

## Samples: `{prompt}` (top: base model, bottom: with the adapter; same seeds)

![samples](samples.png)
"""
    write_text(output_dir / "README.md", text)
    return {"model_card": output_dir / "README.md", "samples": grid_path}
