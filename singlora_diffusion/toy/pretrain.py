"""`python -m singlora_diffusion.toy pretrain`: make the toy base the package ships (toy:shapes).

Three stages, all from scratch on procedurally drawn shapes (world.py):
  1. the VAE, on every kind of shape and colour (the subject's included: SD's VAE has
     seen every kind of image), reconstruction + a small KL term;
  2. the text encoder and UNet together, on the known shapes and colours only
     (epsilon prediction on SD's noise schedule, 10 % empty captions so classifier-free
     guidance works, a cosine learning-rate decay);
  3. the feature extractor the toy scorer uses, on known shapes and the subject, half of
     them passed through the VAE so it also knows decoded images.
The subject (a magenta cross) never reaches the text encoder or the UNet; only the
extractor and the VAE see it, as DINO and SD's VAE have seen dogs.

Everything a run did is recorded beside the weights (record.json): the command, seed,
thread count, data, time per stage and the loss curves.
"""
from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

from . import world
from .models import FeatureNet, build_pipeline, called_subject


@dataclass
class PretrainSettings:
    n_images: int = 16000        # captioned pretraining images (fixed set)
    vae_steps: int = 800
    denoiser_steps: int = 3500
    extractor_steps: int = 2000
    batch: int = 32
    lr: float = 1e-3
    seed: int = 0


QUICK = PretrainSettings(n_images=256, vae_steps=20, denoiser_steps=30, extractor_steps=20, batch=8)


def to_tensor(images) -> torch.Tensor:
    return torch.from_numpy(world.to_array(images)).float() / 127.5 - 1.0


def class_dataset(n: int, seed: int):
    rng = random.Random(seed)
    samples = [world.class_sample(rng) for _ in range(n)]
    return to_tensor([s[0] for s in samples]), [s[1] for s in samples], torch.tensor([s[2] for s in samples])


def _batches(n: int, batch: int, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield torch.randint(0, n, (batch,), generator=g)


def _every(steps: int) -> int:
    return max(1, steps // 40)  # ~40 points per loss curve


def train_vae(vae, images: torch.Tensor, steps: int, batch: int, seed: int, log) -> list:
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    vae.train()
    curve = []
    for i, idx in enumerate(_batches(len(images), batch, steps, seed)):
        x = images[idx]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i % _every(steps) == 0 or i == steps - 1:
            curve.append((i, loss.item()))
            log(f"  vae step {i}: loss {loss.item():.4f}")
    vae.eval()
    return curve


@torch.no_grad()
def encode(vae, images: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    dists = [vae.encode(images[i:i + batch]).latent_dist for i in range(0, len(images), batch)]
    return torch.cat([d.mean for d in dists]), torch.cat([d.std for d in dists])


def encode_prompts(pipe, prompts: list[str]) -> torch.Tensor:
    """Text-encoder states through the pipeline's own encode_prompt (gradients flow when training)."""
    return pipe.encode_prompt(prompts, pipe.text_encoder.device, 1, False)[0]


def train_denoiser(pipe, mean, std, captions, s: PretrainSettings, log) -> list:
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    params = list(pipe.unet.parameters()) + list(pipe.text_encoder.parameters())
    # No weight decay: it would shrink the embeddings of tokens never seen (like "sks")
    # towards zero, unlike a real CLIP whose rare tokens keep their pretrained vectors.
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0)
    warmup = 200  # then cosine to 2 % of lr (the schedule of nanoGPT's get_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: (k + 1) / warmup if k < warmup else
        0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, (k - warmup) / max(1, s.denoiser_steps - warmup)))))
    pipe.unet.train()
    pipe.text_encoder.train()
    g = torch.Generator().manual_seed(s.seed + 1)
    scale = pipe.vae.config.scaling_factor
    ema, curve = None, []
    for i, idx in enumerate(_batches(len(mean), s.batch, s.denoiser_steps, s.seed)):
        latents = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * scale
        prompts = [("" if torch.rand((), generator=g) < 0.1 else captions[j]) for j in idx.tolist()]
        states = encode_prompts(pipe, prompts)
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (s.batch,), generator=g)
        pred = pipe.unet(noise_scheduler.add_noise(latents, noise, t), t, states).sample
        loss = F.mse_loss(pred, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if i % _every(s.denoiser_steps) == 0 or i == s.denoiser_steps - 1:
            curve.append((i, ema))
            log(f"  denoiser step {i}: loss {ema:.4f}")
    pipe.unet.eval()
    pipe.text_encoder.eval()
    return curve


def extractor_dataset(n: int, seed: int):
    """Class images plus the subject (a quarter), each with its three labels."""
    rng = random.Random(seed)
    images, labels = [], []
    for i in range(n):
        image, _, label = world.subject_sample(rng) if i % 4 == 0 else world.class_sample(rng)
        images.append(image)
        labels.append(label)
    # Backgrounds are known colours, the first entries of ALL_COLOURS: their indices agree.
    return to_tensor(images), torch.tensor(labels)


@torch.no_grad()
def round_trip(vae, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([vae.decode(vae.encode(images[i:i + batch]).latent_dist.mean).sample.clamp(-1, 1)
                      for i in range(0, len(images), batch)])


def train_extractor(images, labels, steps: int, batch: int, seed: int, log) -> tuple[FeatureNet, list]:
    torch.manual_seed(seed)
    net = FeatureNet()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * k / steps)))
    curve = []
    for i, idx in enumerate(_batches(len(images), batch, steps, seed)):
        logits = net(images[idx])
        loss = sum(F.cross_entropy(lg, labels[idx, k]) for k, lg in enumerate(logits))
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if i % _every(steps) == 0 or i == steps - 1:
            curve.append((i, loss.item()))
            log(f"  extractor step {i}: loss {loss.item():.4f}")
    return net.eval(), curve


@torch.no_grad()
def extractor_accuracy(net: FeatureNet, images, labels) -> dict[str, float]:
    preds = [lg.argmax(-1) for lg in net(images)]
    acc = {name: (p == labels[:, k]).float().mean().item() for k, (name, p) in
           enumerate(zip(("shape", "colour", "background"), preds))}
    subject = labels[:, 0] == world.ALL_SHAPES.index(world.SUBJECT_SHAPE)
    called = called_subject(net, images)
    acc["subject_recall"] = called[subject].float().mean().item()
    acc["subject_false_positive"] = called[~subject].float().mean().item()
    return acc


def pretrain(out: Path, s: PretrainSettings, log=print) -> dict:
    """Train the three parts and write the shipped files to `out` (toy.base.write_world)."""
    from .base import write_world

    started = time.perf_counter()
    seconds = {}
    pipe = build_pipeline(s.seed)
    images, captions, _ = class_dataset(s.n_images, s.seed)
    rng = random.Random(s.seed + 3)
    vae_images = torch.cat([images[: s.n_images // 2], to_tensor([world.any_sample(rng) for _ in range(s.n_images // 2)])])
    log(f"pretraining on {s.n_images} images, e.g. '{captions[0]}'")
    vae_curve = train_vae(pipe.vae, vae_images, s.vae_steps, s.batch, s.seed, log)
    mean, std = encode(pipe.vae, images)
    # SD's convention: latents are multiplied by 1/std so the UNet sees unit variance.
    pipe.vae.register_to_config(scaling_factor=float(1.0 / mean.std()))
    seconds["vae"] = time.perf_counter() - started
    denoiser_curve = train_denoiser(pipe, mean, std, captions, s, log)
    seconds["denoiser"] = time.perf_counter() - started - seconds["vae"]
    ex_images, ex_labels = extractor_dataset(max(4 * s.batch, s.n_images // 2), s.seed + 7)
    half = len(ex_images) // 2
    ex_images[half:] = round_trip(pipe.vae, ex_images[half:])
    net, ex_curve = train_extractor(ex_images, ex_labels, s.extractor_steps, 64, s.seed, log)
    test_images, test_labels = extractor_dataset(1024, s.seed + 99)
    seconds["extractor"] = time.perf_counter() - started - seconds["vae"] - seconds["denoiser"]
    seconds["total"] = time.perf_counter() - started
    record = {
        "command": " ".join(["python -m singlora_diffusion.toy"] + sys.argv[1:]),
        "settings": asdict(s), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "data": {"denoiser": f"{s.n_images} images of {len(world.SHAPES)} shapes x {len(world.COLOURS)} colours "
                             f"on another of those colours, captioned 'a red circle on a blue background'",
                 "vae": "half the denoiser's images, half any shape in any colour (the subject's included)",
                 "extractor": "three quarters class images, one quarter the subject; half of them VAE round trips"},
        "seconds": seconds,
        "losses": {"vae": vae_curve, "denoiser_ema": denoiser_curve, "extractor": ex_curve},
        "extractor_test_accuracy": {"plain": extractor_accuracy(net, test_images, test_labels),
                                    "vae_round_trip": extractor_accuracy(net, round_trip(pipe.vae, test_images),
                                                                         test_labels)},
    }
    write_world(out, pipe, net, record)
    log(f"pretrained in {seconds['total']:.0f} s; extractor accuracy {record['extractor_test_accuracy']}")
    return record
