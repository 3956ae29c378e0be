"""The model card README.md and the sample grid written beside a trained adapter."""
from __future__ import annotations

from pathlib import Path

from ..files import write_text
from .build import Trainee
from .config import TrainConfig
from .dataset import Concept, sample_prompts


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


def write_model_card(cfg: TrainConfig, trainee: Trainee, output_dir: Path, weights: dict[str, Path],
                     concepts: list[Concept]) -> dict:
    """README.md + samples.png: per prompt, the base model (a row) and the adapted one (the row below),
    same seeds. The prompts are the validation prompts, else each concept's instance prompt.

    weights: what write_final wrote ("adapter", "diffusers", "kohya"); the card says which file goes where.
    """
    from diffusers.utils import make_image_grid

    from ..adapters import adapters_off
    from ..generate import render

    prompts = sample_prompts(cfg, concepts)
    for m in trainee.trained.values():
        m.eval()
    settings = dict(seed=cfg.seed, steps=cfg.validation_inference_steps, num_images=cfg.num_validation_images,
                    width=cfg.resolution, height=cfg.resolution)
    rows = []
    for prompt in prompts:
        embeds = trainee.prompts.for_render(prompt)  # the text encoders may be freed (run.train)
        with adapters_off(trainee.pipe):
            rows.append(render(trainee.pipe, prompt, embeds=embeds, **settings))
        rows.append(render(trainee.pipe, prompt, embeds=embeds, **settings))
    grid_path = output_dir / "samples.png"
    make_image_grid([image for row in rows for image in row], rows=len(rows), cols=len(rows[0])).save(grid_path)
    subjects = "\n".join(f"- instance prompt: `{c.instance_prompt}` ({c.instance_data_dir}"
                         + (f"; class prompt `{c.class_prompt}`" if c.class_prompt else "")
                         + (f"; {c.repeats} repeats" if c.repeats > 1 else "") + ")" for c in concepts)
    uses = []
    if "kohya" in weights:
        # A1111 has no SD3/Flux support; Forge's Flux loader shares ComfyUI's key map
        tools = "ComfyUI, A1111, Forge" if trainee.family.denoiser == "unet" else "ComfyUI (Forge: Flux)"
        uses.append(f"| {tools} | copy `{weights['kohya'].name}` to `models/loras/` |")
    else:  # why: training/weights.py
        uses.append(f"| ComfyUI, A1111, Forge | no kohya file is written for {cfg.adapter} baseline runs |")
    uses.append(f"| diffusers | `pipe.load_lora_weights(\"{output_dir}\")` reads `{weights['diffusers'].name}` |")
    if "adapter" in weights:
        uses.append(f"| singlora CLI, web UI | `singlora generate --adapter {weights['adapter']}`, or pick "
                    f"`{weights['adapter'].name}` in the web UI |")
    uses = "\n".join(uses)
    text = f"""---
base_model: {cfg.pretrained_model_name_or_path}
instance_prompt: {concepts[0].instance_prompt}
tags: [stable-diffusion, dreambooth, {cfg.adapter}, singlora-diffusion]
---
# {cfg.adapter} DreamBooth adapter

Trained with singlora-diffusion `train_dreambooth.py` on
`{cfg.pretrained_model_name_or_path}` for {cfg.max_train_steps} steps.

{subjects}
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

## Samples: {", ".join(f"`{p}`" for p in prompts)} (per prompt, a row of the base model, then a row with
the adapter; same seeds)

![samples](samples.png)
"""
    write_text(output_dir / "README.md", text)
    return {"model_card": output_dir / "README.md", "samples": grid_path}
