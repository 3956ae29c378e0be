"""`make demo`: the whole path offline in about a minute on a CPU.

Builds (once) a tiny random-weight SD1.5-architecture pipeline, injects
SingLoRA, fits it for a few hundred optimizer steps to the bundled dog3
photos with the standard denoising loss, saves the native file, exports it
to diffusers and kohya LoRA, and renders a before/after image. The tiny model
is random-initialised: the images show that the pipeline works, not a dog.
The DreamBooth trainer (train_dreambooth.py) is the real training path.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
from torch.nn import functional as F

from .config import AdapterConfig
from .export import export_diffusers, export_kohya
from .format import WEIGHTS_NAME, save_adapter
from .generate import render
from .inject import attach_ramp, singlora_parameters
from .pipelines import inject_adapters, load_pipeline, pipeline_components
from .tiny import save_tiny_pipeline

PROMPT = "a photo of sks dog"


def bundled_subject() -> Path:
    return Path(str(resources.files("singlora_diffusion") / "assets" / "dog3"))


def _subject_latents(pipe, folder: Path, size: int) -> torch.Tensor:
    from PIL import Image, ImageOps
    from torchvision.transforms import functional as TF

    images = []
    for path in sorted(folder.glob("*.jpg")):
        image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
        image = TF.center_crop(TF.resize(image, size, interpolation=TF.InterpolationMode.BICUBIC), size)
        images.append(TF.to_tensor(image) * 2 - 1)
    with torch.no_grad():  # encoded once: the demo uses no random augmentation
        latents = pipe.vae.encode(torch.stack(images)).latent_dist.mean
    return latents * pipe.vae.config.scaling_factor


def run_demo(out_dir: str | Path = "outputs/demo", steps: int = 300, rank: int = 4, lr: float = 1e-3,
             seed: int = 0) -> dict[str, Path]:
    from diffusers import DDPMScheduler
    from PIL import Image

    out = Path(out_dir)
    base = out / "tiny-sd15"
    if not (base / "model_index.json").is_file():
        save_tiny_pipeline(base, "sd15", seed)
    pipe = load_pipeline(base)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    before = render(pipe, PROMPT, seed=seed, steps=20, output_type="pil")[0]

    cfg = AdapterConfig(rank=rank, target_modules="attn")
    components = pipeline_components(pipe)
    inject_adapters(components, cfg, cfg.resolved_ramp_up_steps(steps))
    latents = _subject_latents(pipe, bundled_subject(), size)
    with torch.no_grad():
        text = pipe.text_encoder(pipe.tokenizer(PROMPT, padding="max_length", max_length=77,
                                                return_tensors="pt").input_ids)[0]
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    optimizer = torch.optim.AdamW(singlora_parameters(pipe.unet), lr=lr)
    attach_ramp(optimizer, pipe.unet)  # u(t) advances once per optimizer step
    torch.manual_seed(seed)
    for step in range(steps):
        x0 = latents[torch.randint(len(latents), (1,))]
        noise = torch.randn_like(x0)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (1,))
        pred = pipe.unet(noise_scheduler.add_noise(x0, noise, t), t, text).sample
        loss = F.mse_loss(pred, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step + 1}/{steps}  loss {loss.item():.4f}")

    files = {"adapter": save_adapter(out / WEIGHTS_NAME, components, str(base), cfg.target_modules)}
    files["diffusers"] = export_diffusers(files["adapter"], out)
    files["kohya"] = export_kohya(files["adapter"], out / "kohya_lora.safetensors")
    after = render(pipe, PROMPT, seed=seed, steps=20, output_type="pil")[0]
    grid = Image.new("RGB", (2 * before.width, before.height))
    grid.paste(before, (0, 0))
    grid.paste(after, (before.width, 0))
    files["samples"] = out / "before_after.png"
    grid.save(files["samples"])
    return files
