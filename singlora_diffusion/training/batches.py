"""What one micro-batch is made of: which images, their latents, their prompt embeddings.

Everything random about one training sample (its crop, flip, latent draw,
noise, timestep and caption dropout) is drawn right after `seed_sample` seeds
the RNG from (seed, stream, sample index), where the index counts samples of
the global stream. Batch k of the stream is samples k·batch .. k·batch + batch - 1
(BatchPlan: which items, all of one bucket). A sample therefore does not
depend on which process drew it or on whether the run was resumed: a resumed
run draws exactly what the uninterrupted one drew, and (with one bucket)
2 processes × batch 1 see exactly what 1 process × batch 2 sees. The data
position is the number of samples consumed.
"""
from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ..images import load_image
from ..pipelines import to_denoiser_latents
from .data import Crop, Size, augmentations_are_deterministic, prepare_image
from .dataset import Concept, Item
from .loss import draw_noise


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


class BatchPlan:
    """Which items make up batch k of the global stream; every batch holds items of one size (bucket).

    Per round, bucket b contributes ceil(n_b / batch) batches, in an order drawn from (seed,
    round), so every image is seen about equally often whatever the buckets' sizes; within a
    bucket, items follow that bucket's own stream (sample_indices) batch after batch. With one
    bucket (no --enable_bucket) batch k is samples k·batch .. of the plain sample stream.
    Processes take consecutive batches (see TrainingLoop.optimizer_step): DDP shards buckets.
    """

    def __init__(self, sizes: list[Size], batch: int, seed: int):
        self.batch, self.seed = batch, seed
        self.sizes = sorted(set(sizes))
        self.members = [[i for i, s in enumerate(sizes) if s == size] for size in self.sizes]
        self.per_round = [math.ceil(len(m) / batch) for m in self.members]
        self._order: tuple[int, list[int]] | None = None  # (round, bucket of each of its batches)

    def order(self, r: int) -> list[int]:
        if self._order is None or self._order[0] != r:
            slots = torch.tensor([b for b, n in enumerate(self.per_round) for _ in range(n)])
            if len(self.sizes) > 1:
                slots = slots[torch.randperm(len(slots), generator=torch.Generator().manual_seed(self.seed * 100_019 + r))]
            self._order = (r, slots.tolist())
        return self._order[1]

    def batch_of(self, k: int) -> tuple[Size, list[int]]:
        """(size, item indices) of batch k."""
        r, pos = divmod(k, sum(self.per_round))
        order = self.order(r)
        b = order[pos]
        first = (r * self.per_round[b] + order[:pos].count(b)) * self.batch  # in bucket b's own stream
        members = self.members[b]
        return self.sizes[b], [members[i] for i in sample_indices(len(members), first, self.batch,
                                                                  self.seed + 7919 * b)]


class LatentSource:
    """VAE latents of image i (and its SDXL crop conditioning) at a size, encoded once when allowed.

    With a center crop the only randomness is the flip, so both orientations
    are cached; a random crop differs every time and is encoded every step.
    The cache keeps the latent distribution (mean, std) and a fresh sample is
    drawn per step, as without caching. Each image is cached at its own size
    (`sizes`, default the square resolution) up front, and at any other size
    (class images paired with an instance bucket) when first asked for.
    """

    def __init__(self, vae, paths: list[Path], resolution: int, center_crop: bool, random_flip: bool,
                 cache: bool, sizes: list[Size] | None = None):
        self.vae, self.paths, self.resolution = vae, paths, resolution
        self.sizes = sizes or [(resolution, resolution)] * len(paths)
        # read once: asking a diffusers model for .device/.dtype walks all its parameters
        self.device, self.dtype = vae.device, vae.dtype
        self.center_crop, self.random_flip = center_crop, random_flip
        self.cached = cache and augmentations_are_deterministic(center_crop, False)
        self.cache: dict[tuple[int, bool, Size], tuple[torch.Tensor, torch.Tensor, Crop]] = {}
        if self.cached:
            for i in range(len(paths)):
                for flip in ((False, True) if random_flip else (False,)):
                    self.cache[(i, flip, self.sizes[i])] = self._encode(i, flip, self.sizes[i])

    @torch.no_grad()
    def _encode(self, i: int, flip: bool, size: Size):
        pixels, crop = prepare_image(load_image(self.paths[i]), size, self.center_crop, flip)
        dist = self.vae.encode(pixels[None].to(self.device, self.dtype)).latent_dist
        return dist.mean[0], dist.std[0], crop

    def get(self, i: int, size: Size | None = None) -> tuple[torch.Tensor, list[int]]:
        """Image i as VAE latents (c, h/8, w/8) at `size` (w, h; default its own), not yet scaled for
        the UNet, and its SDXL time ids.

        Draws (in this order) the flip, the crop and the latent sample from the global RNG.
        """
        flip = self.random_flip and bool(torch.rand(()) < 0.5)
        key = (i, flip, size or self.sizes[i])
        if not self.cached:
            mean, std, crop = self._encode(*key)
        else:
            if key not in self.cache:  # no RNG is drawn by encoding: caching late changes no sample
                self.cache[key] = self._encode(*key)
            mean, std, crop = self.cache[key]
        latent = mean + std * torch.randn(mean.shape).to(mean.device, mean.dtype)
        return latent, crop.time_ids()

    def scale(self, latents: torch.Tensor) -> torch.Tensor:
        """A batch of VAE latents as the UNet is trained on them."""
        return to_denoiser_latents(self.vae.config, latents)


POOLED_INPUT = {"sdxl": "text_embeds", "sd3": "pooled_projections", "flux": "pooled_projections"}
SHARED = ("txt_ids",)  # the same for every prompt: not stacked along the batch


class PromptEncoder:
    """Prompt conditioning, through the pipeline's own encode_prompt (generate.encode_prompt), as
    the family's forward (objective.FORWARD) takes it: {"encoder_hidden_states": …, and the
    family's pooled input; Flux: its tokens' (zero) RoPE ids "txt_ids", as FluxPipeline makes them}.

    With `cache` (no text encoder trains), each prompt is encoded once and reused; `prepare`
    encodes every prompt a run needs, for training and for rendering (validation, model card),
    after which the text encoders can be freed (release_text_encoders): T5 alone is 9.5 GB in
    bf16. (When CLIP trains, every step re-encodes, T5 included, as diffusers' SD3/Flux scripts do.)
    """

    def __init__(self, pipe, cache: bool, max_sequence_length: int | None = None):
        from ..generate import pipeline_arch
        from .objective import DEFAULT_MAX_SEQUENCE_LENGTH

        self.pipe, self.cache_enabled = pipe, cache
        self.arch = pipeline_arch(pipe)
        # T5 tokens (SD3 / Flux): as given, else the family's default in diffusers' scripts
        self.max_sequence_length = max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH.get(self.arch)
        self.device = pipe.device  # once: the property walks every submodule
        self.cache: dict[str, dict] = {}
        self.render_cache: dict[str, dict] = {}
        self.released = False  # the text encoders are gone: only cached prompts can be served

    def _encode(self, prompt: str) -> dict:
        from ..generate import encode_prompt

        t5 = self.max_sequence_length if self.arch in ("sd3", "flux") else None
        out = encode_prompt(self.pipe, prompt, max_sequence_length=t5, device=self.device)
        cond = {"encoder_hidden_states": out["prompt_embeds"]}
        if self.arch in POOLED_INPUT:
            cond[POOLED_INPUT[self.arch]] = out["pooled_prompt_embeds"]
        if self.arch == "flux":
            embeds = out["prompt_embeds"]
            cond["txt_ids"] = torch.zeros(embeds.shape[1], 3, device=embeds.device, dtype=embeds.dtype)
        return cond

    def _missing(self, prompt: str, use: str) -> Exception:
        return RuntimeError(f"prompt {prompt!r} is needed for {use} but was not encoded before the text "
                            f"encoders were freed (PromptEncoder.prepare): a bug; --cache_text_embeddings "
                            f"false keeps the text encoders")

    def get(self, prompt: str) -> dict:
        if not self.cache_enabled:
            return self._encode(prompt)
        if prompt not in self.cache:
            if self.released:
                raise self._missing(prompt, "training")
            with torch.no_grad():
                self.cache[prompt] = self._encode(prompt)
        return self.cache[prompt]

    def batch(self, prompts: list[str]) -> dict:
        """The conditioning of a micro-batch's prompts, stacked."""
        conds = [self.get(p) for p in prompts]
        return {k: conds[0][k] if k in SHARED else torch.cat([c[k] for c in conds]) for k in conds[0]}

    def for_render(self, prompt: str) -> dict | None:
        """generate.render's embeds for `prompt` (with guidance's negatives, T5 at the pipeline's
        own length, as rendering from the string encodes it); None while the text encoders are
        there and nothing is cached: render encodes the string itself."""
        from ..generate import encode_prompt

        if prompt not in self.render_cache:
            if self.released:
                raise self._missing(prompt, "rendering")
            if not self.cache_enabled:
                return None
            with torch.no_grad():
                self.render_cache[prompt] = encode_prompt(self.pipe, prompt, guidance=True, device=self.device)
        return self.render_cache[prompt]

    def prepare(self, training: list[str], rendering: list[str]) -> None:
        """Encode now every prompt the run will train on and render."""
        for prompt in dict.fromkeys(training):
            self.get(prompt)
        for prompt in dict.fromkeys(rendering):
            self.for_render(prompt)


def run_prompts(cfg, concepts: list[Concept], items: list[Item]) -> tuple[list[str], list[str]]:
    """(the prompts training conditions on, the prompts it renders): every caption and instance
    prompt, the class prompts with prior preservation, "" with caption dropout; the validation and
    model-card prompts (dataset.sample_prompts)."""
    from .dataset import sample_prompts

    training = [item.prompt for item in items]
    if cfg.with_prior_preservation:
        training += [c.class_prompt for c in concepts]
    if cfg.caption_dropout_rate:
        training.append("")
    return list(dict.fromkeys(training)), sample_prompts(cfg, concepts)


def release_text_encoders(pipe) -> list[str]:
    """Drop the pipeline's text encoders (after every prompt was encoded): the names freed.

    As diffusers' SD3/Flux DreamBooth scripts do once their embeddings are computed; tokenizers stay.
    """
    import gc

    names = [n for n in ("text_encoder", "text_encoder_2", "text_encoder_3") if getattr(pipe, n, None) is not None]
    pipe.register_modules(**{n: None for n in names})
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return names


@dataclass
class MicroBatch:
    """One process's micro-batch, instance samples first, then as many class samples."""
    latents: torch.Tensor      # (b, c, h, w), VAE latents scaled for the UNet
    time_ids: torch.Tensor     # (b, 6): SDXL's size and crop conditioning
    noise: torch.Tensor
    timesteps: torch.Tensor    # DDPM timesteps, or flow-schedule indices (objective.py)
    prompts: list[str]
    n_instance: int


class TrainingData:
    """The run's samples: batch k of the global stream as latents, noise, timesteps and prompts."""

    def __init__(self, cfg, vae, concepts: list[Concept], items: list[Item], class_images: list[list[Path]],
                 prior: bool):
        self.cfg, self.concepts, self.items = cfg, concepts, items
        paths = list(dict.fromkeys(item.path for item in items))  # an image repeated is encoded once
        self.index = {path: i for i, path in enumerate(paths)}
        size_of = {item.path: item.size for item in items}
        source = lambda images, sizes=None: LatentSource(vae, images, cfg.resolution, cfg.center_crop,  # noqa: E731
                                                         cfg.random_flip, cfg.cache_latents, sizes)
        self.instance = source(paths, [size_of[p] for p in paths])
        self.plan = BatchPlan([item.size for item in items], cfg.train_batch_size, cfg.seed)
        # class images: one source over every concept's, trained at the size of the batch they join
        self.class_images = class_images if prior else []
        self.class_offset = [sum(map(len, self.class_images[:c])) for c in range(len(self.class_images))]
        self.prior = source([p for images in self.class_images for p in images]) if prior else None

    def sample(self, source: LatentSource, i: int, size: Size, stream: str, s: int, draw_timestep):
        seed_sample(self.cfg.seed, stream, s)
        latent, time_id = source.get(i, size)
        noise = draw_noise(tuple(latent.shape), self.cfg.noise_offset)
        return latent, time_id, noise, draw_timestep()

    def micro_batch(self, k: int, draw_timestep) -> MicroBatch:
        """Batch k: its instance samples (and a class sample of the same concept for each).

        draw_timestep() draws one sample's timestep from the global RNG (the objective's).
        """
        cfg = self.cfg
        size, members = self.plan.batch_of(k)
        first = k * cfg.train_batch_size
        samples, prompts = [], []
        for j, m in enumerate(members):
            item = self.items[m]
            samples.append(self.sample(self.instance, self.index[item.path], size, "instance", first + j,
                                       draw_timestep))
            # drawn last, and only when asked for: runs without dropout keep their samples
            drop = cfg.caption_dropout_rate and bool(torch.rand(()) < cfg.caption_dropout_rate)
            prompts.append("" if drop else item.prompt)
        if self.prior is not None:
            for j, m in enumerate(members):
                c = self.items[m].concept
                n = len(self.class_images[c])
                pick = sample_indices(n, first + j, 1, cfg.seed + 1 + 7919 * c)[0]
                samples.append(self.sample(self.prior, self.class_offset[c] + pick, size, "class", first + j,
                                           draw_timestep))
                prompts.append(self.concepts[c].class_prompt)
        latents, time_ids, noise, timesteps = zip(*samples)
        return MicroBatch(self.instance.scale(torch.stack(latents)), torch.tensor(time_ids), torch.stack(noise),
                          torch.stack(timesteps), prompts, len(members))
