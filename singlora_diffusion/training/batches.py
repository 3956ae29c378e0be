"""What one micro-batch is made of: which images, their latents, their prompt embeddings.

Everything random about one training sample (its crop, flip, latent draw,
noise and timestep) is drawn right after `seed_sample` seeds the RNG from
(seed, stream, sample index), where the index counts samples of the global
stream (sample_indices). A sample therefore does not depend on which process
drew it, on the batch it was in, or on whether the run was resumed: a resumed
run draws exactly what the uninterrupted one drew, and 2 processes × batch 1
see exactly what 1 process × batch 2 sees. The data position is the number of
samples consumed.
"""
from __future__ import annotations

import hashlib
import random
from pathlib import Path

import torch

from ..images import load_image
from ..pipelines import to_unet_latents
from .data import Crop, augmentations_are_deterministic, prepare_image


def seed_sample(seed: int, stream: str, index: int) -> None:
    """Seed torch's and Python's global RNGs for sample `index` of `stream` ("instance" or "class")."""
    digest = hashlib.sha256(f"{seed}/{stream}/{index}".encode()).digest()
    s = int.from_bytes(digest[:8], "little") % (2 ** 63)
    torch.manual_seed(s)
    random.seed(s)


def sample_indices(n: int, first_sample: int, batch: int, seed: int) -> list[int]:
    """Image indices of samples first_sample .. first_sample + batch - 1 of the global stream.

    The stream is one seeded permutation of the n images per epoch. Processes take
    consecutive slices of it (see fit), so they see disjoint shards, and a checkpoint
    records how many samples were consumed: a resume with another process count
    continues the same stream.
    """
    out = []
    for s in range(first_sample, first_sample + batch):
        epoch, pos = divmod(s, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(int(perm[pos]))
    return out


class LatentSource:
    """VAE latents of image i (and its SDXL crop conditioning), encoded once when allowed.

    With a center crop the only randomness is the flip, so both orientations
    are cached; a random crop differs every time and is encoded every step.
    The cache keeps the latent distribution (mean, std) and a fresh sample is
    drawn per step, as without caching.
    """

    def __init__(self, vae, paths: list[Path], resolution: int, center_crop: bool, random_flip: bool,
                 cache: bool):
        self.vae, self.paths, self.resolution = vae, paths, resolution
        # read once: asking a diffusers model for .device/.dtype walks all its parameters
        self.device, self.dtype = vae.device, vae.dtype
        self.center_crop, self.random_flip = center_crop, random_flip
        self.cached = cache and augmentations_are_deterministic(center_crop, False)
        self.cache: dict[tuple[int, bool], tuple[torch.Tensor, torch.Tensor, Crop]] = {}
        if self.cached:
            for i in range(len(paths)):
                for flip in ((False, True) if random_flip else (False,)):
                    self.cache[(i, flip)] = self._encode(i, flip)

    @torch.no_grad()
    def _encode(self, i: int, flip: bool):
        pixels, crop = prepare_image(load_image(self.paths[i]), self.resolution, self.center_crop, flip)
        dist = self.vae.encode(pixels[None].to(self.device, self.dtype)).latent_dist
        return dist.mean[0], dist.std[0], crop

    def get(self, i: int) -> tuple[torch.Tensor, list[int]]:
        """Image i as VAE latents (c, h, w), not yet scaled for the UNet, and its SDXL time ids.

        Draws (in this order) the flip, the crop and the latent sample from the global RNG.
        """
        flip = self.random_flip and bool(torch.rand(()) < 0.5)
        mean, std, crop = self.cache[(i, flip)] if self.cached else self._encode(i, flip)
        latent = mean + std * torch.randn(mean.shape).to(mean.device, mean.dtype)
        return latent, crop.time_ids(self.resolution)

    def scale(self, latents: torch.Tensor) -> torch.Tensor:
        """A batch of VAE latents as the UNet is trained on them."""
        return to_unet_latents(self.vae.config, latents)


class PromptEncoder:
    """Prompt embeddings through the pipeline's own encode_prompt (SD and SDXL alike).

    When no text encoder trains, each prompt is encoded once and reused.
    """

    def __init__(self, pipe, cache: bool):
        self.pipe, self.cache_enabled = pipe, cache
        self.device = pipe.device  # once: the property walks every submodule
        self.sdxl = getattr(pipe, "text_encoder_2", None) is not None
        self.cache: dict[str, tuple] = {}

    def _encode(self, prompt: str):
        if self.sdxl:
            embeds, _, pooled, _ = self.pipe.encode_prompt(prompt, device=self.device, num_images_per_prompt=1,
                                                           do_classifier_free_guidance=False)
            return embeds, pooled
        return self.pipe.encode_prompt(prompt, self.device, 1, False)[0], None

    def get(self, prompt: str):
        if not self.cache_enabled:
            return self._encode(prompt)
        if prompt not in self.cache:
            with torch.no_grad():
                self.cache[prompt] = self._encode(prompt)
        return self.cache[prompt]
