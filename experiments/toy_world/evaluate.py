"""The toy DreamBooth's metrics, on fixed held-out sets so every run is measured alike.

- subject_loss: denoising MSE on fresh renderings of the subject (positions, sizes and
  backgrounds the training images did not have), each with its caption as the bundled
  subject's are captioned ("a sks shape on a white background");
- feature_sim: mean cosine similarity, in the toy base's extractor's feature space, between
  images generated from the instance prompt 'a sks shape' and real subject images (the DINO
  score of DreamBench, with the toy extractor in place of DINO);
- subject_rate: fraction of those generated images the extractor calls the subject, its
  shape and its colour (a magenta cross);
- class_loss: denoising MSE on ordinary pretraining captions and images;
  prior drift = class_loss(adapted) - class_loss(base).
Noise and timesteps are drawn once from a fixed seed: differences between
runs are the model's, not the dice's.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

from singlora_diffusion.toy import base, world
from singlora_diffusion.toy.models import called_subject
from singlora_diffusion.toy.pretrain import class_dataset, encode_prompts, to_tensor


@dataclass
class EvalSizes:
    subject: int = 48        # held-out subject renderings
    classes: int = 96        # held-out class images
    timesteps: int = 8       # evenly spaced noise levels per image
    generated: int = 16      # images generated from the instance prompt
    inference_steps: int = world.SAMPLING["steps"]
    guidance: float = world.SAMPLING["guidance"]




class Evaluator:
    def __init__(self, folder: Path, sizes: EvalSizes, seed: int = 12345):
        """folder: the toy base's files (its extractor scores the runs)."""
        self.sizes = sizes
        self.extractor = base.load_extractor(folder)
        rng = random.Random(seed)
        samples = [world.subject_sample(rng) for _ in range(sizes.subject)]
        self.subject, self.subject_captions = to_tensor([s[0] for s in samples]), [s[1] for s in samples]
        self.classes, self.captions, _ = class_dataset(sizes.classes, seed + 1)
        with torch.no_grad():
            self.subject_features = F.normalize(self.extractor.features(self.subject), dim=-1)

    @torch.no_grad()
    def denoise_loss(self, pipe, images: torch.Tensor, prompts: list[str]) -> float:
        from diffusers import DDPMScheduler

        sched = DDPMScheduler.from_config(pipe.scheduler.config)
        n_t = self.sizes.timesteps
        T = sched.config.num_train_timesteps
        g = torch.Generator().manual_seed(0)
        latents = pipe.vae.encode(images).latent_dist.mean * pipe.vae.config.scaling_factor
        states = encode_prompts(pipe, prompts)
        total = 0.0
        for k in range(n_t):
            t = torch.full((len(images),), int((k + 0.5) * T / n_t))
            noise = torch.randn(latents.shape, generator=g)
            pred = pipe.unet(sched.add_noise(latents, noise, t), t, states).sample
            # The training target as diffusers defines it (the toy world predicts epsilon).
            v = sched.config.prediction_type == "v_prediction"
            target = sched.get_velocity(latents, noise, t) if v else noise
            total += F.mse_loss(pred.float(), target).item()
        return total / n_t

    @torch.no_grad()
    def generate(self, pipe, prompt: str) -> torch.Tensor:
        """(N, 3, 32, 32) in [-1, 1], with our renderer's seeded generator."""
        from singlora_diffusion.generate import render

        images = render(pipe, prompt, seed=0, steps=self.sizes.inference_steps, guidance=self.sizes.guidance,
                        num_images=self.sizes.generated, width=world.SIZE, height=world.SIZE, output_type="pt")
        return images.float().clamp(0, 1) * 2 - 1

    @torch.no_grad()
    def metrics(self, pipe, keep: list | None = None) -> dict[str, float]:
        """The four metrics; the generated images are appended to `keep` when given."""
        for m in (pipe.unet, pipe.text_encoder, pipe.vae):
            m.eval()
        generated = self.generate(pipe, world.INSTANCE_PROMPT)
        if keep is not None:
            keep.append(generated)
        feats = F.normalize(self.extractor.features(generated), dim=-1)
        return {
            "subject_loss": self.denoise_loss(pipe, self.subject, self.subject_captions),
            "class_loss": self.denoise_loss(pipe, self.classes, self.captions),
            "feature_sim": (feats @ self.subject_features.T).mean().item(),
            "subject_rate": called_subject(self.extractor, generated).float().mean().item(),
        }

    def reference(self) -> dict[str, float]:
        """Real-vs-real feature similarity: the ceiling of feature_sim."""
        f = self.subject_features
        n = len(f)
        sims = f @ f.T
        return {"feature_sim_real_vs_real": ((sims.sum() - sims.diagonal().sum()) / (n * (n - 1))).item()}
