"""`python -m experiments.toy_world pretrain`: make the pretrained model the sweeps fine-tune.

Three stages, all from scratch on procedurally drawn shapes (shapes.py):
  1. the VAE (reconstruction + a small KL term),
  2. the text encoder and UNet together (epsilon prediction on SD's noise
     schedule, 10 % empty captions so classifier-free guidance works),
  3. the feature extractor used by the fidelity metric.
The subject (an orange star) is never shown to the VAE pretraining set, the
text encoder or the UNet; only the extractor sees it, as DINO has seen dogs.
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from . import shapes
from .models import FeatureNet, build_pipeline


def to_tensor(images) -> torch.Tensor:
    return torch.from_numpy(shapes.to_array(images)).float() / 127.5 - 1.0


def class_dataset(n: int, seed: int):
    rng = random.Random(seed)
    samples = [shapes.class_sample(rng) for _ in range(n)]
    return to_tensor([s[0] for s in samples]), [s[1] for s in samples], torch.tensor([s[2] for s in samples])


def _batches(n: int, batch: int, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield torch.randint(0, n, (batch,), generator=g)


def train_vae(vae, images: torch.Tensor, steps: int, batch: int, seed: int, log) -> float:
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    vae.train()
    for i, idx in enumerate(_batches(len(images), batch, steps, seed)):
        x = images[idx]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i % 100 == 0 or i == steps - 1:
            log(f"  vae step {i}: loss {loss.item():.4f}")
    vae.eval()
    return loss.item()


@torch.no_grad()
def encode(vae, images: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    dists = [vae.encode(images[i:i + batch]).latent_dist for i in range(0, len(images), batch)]
    return torch.cat([d.mean for d in dists]), torch.cat([d.std for d in dists])


def encode_prompts(pipe, prompts: list[str]) -> torch.Tensor:
    """Text-encoder states through the pipeline's own encode_prompt (gradients flow when training)."""
    return pipe.encode_prompt(prompts, pipe.text_encoder.device, 1, False)[0]


def train_denoiser(pipe, mean, std, captions, steps: int, batch: int, seed: int, log) -> float:
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    params = list(pipe.unet.parameters()) + list(pipe.text_encoder.parameters())
    # No weight decay: it would shrink the embeddings of tokens never seen (like "sks")
    # towards zero, unlike a real CLIP whose rare tokens keep their pretrained vectors.
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 200))
    pipe.unet.train()
    pipe.text_encoder.train()
    g = torch.Generator().manual_seed(seed + 1)
    scale = pipe.vae.config.scaling_factor
    ema = None
    for i, idx in enumerate(_batches(len(mean), batch, steps, seed)):
        latents = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * scale
        prompts = [("" if torch.rand((), generator=g) < 0.1 else captions[j]) for j in idx.tolist()]
        states = encode_prompts(pipe, prompts)
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,), generator=g)
        pred = pipe.unet(noise_scheduler.add_noise(latents, noise, t), t, states).sample
        loss = F.mse_loss(pred, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if i % 250 == 0 or i == steps - 1:
            log(f"  denoiser step {i}: loss {ema:.4f}")
    pipe.unet.eval()
    pipe.text_encoder.eval()
    return ema


def extractor_dataset(n: int, seed: int):
    """Class images plus the subject (a quarter), each with its three labels."""
    rng = random.Random(seed)
    images, labels = [], []
    for i in range(n):
        if i % 4 == 0:
            image, label = shapes.subject_sample(rng)
        else:
            image, _, label = shapes.class_sample(rng)
        images.append(image)
        labels.append(label)
    return to_tensor(images), torch.tensor(labels)


def train_extractor(images, labels, steps: int, batch: int, seed: int, log) -> tuple[FeatureNet, float]:
    torch.manual_seed(seed)
    net = FeatureNet(len(shapes.ALL_SHAPES), len(shapes.COLOURS) + 1, len(shapes.COLOURS))
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    for i, idx in enumerate(_batches(len(images), batch, steps, seed)):
        logits = net(images[idx])
        loss = sum(F.cross_entropy(lg, labels[idx, k]) for k, lg in enumerate(logits))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i % 200 == 0 or i == steps - 1:
            log(f"  extractor step {i}: loss {loss.item():.4f}")
    return net.eval(), loss.item()


@torch.no_grad()
def extractor_accuracy(net: FeatureNet, images, labels) -> list[float]:
    preds = [lg.argmax(-1) for lg in net(images)]
    return [(p == labels[:, k]).float().mean().item() for k, p in enumerate(preds)]


def pretrain(out: Path, *, n_images: int, vae_steps: int, denoiser_steps: int, extractor_steps: int,
             batch: int, seed: int, log=print) -> dict:
    """Train the three parts; save the pipeline to out/model and the extractor to out/extractor.pt."""
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    pipe = build_pipeline(seed)
    images, captions, _ = class_dataset(n_images, seed)
    log(f"pretraining on {n_images} images, e.g. '{captions[0]}'")
    vae_loss = train_vae(pipe.vae, images, vae_steps, batch, seed, log)
    mean, std = encode(pipe.vae, images)
    # SD's convention: latents are multiplied by 1/std so the UNet sees unit variance.
    pipe.vae.register_to_config(scaling_factor=float(1.0 / mean.std()))
    t_vae = time.perf_counter() - started
    denoiser_loss = train_denoiser(pipe, mean, std, captions, denoiser_steps, batch, seed, log)
    t_denoiser = time.perf_counter() - started - t_vae
    pipe.save_pretrained(out / "model")
    ex_images, ex_labels = extractor_dataset(max(4 * batch, n_images // 2), seed + 7)
    net, ex_loss = train_extractor(ex_images, ex_labels, extractor_steps, 64, seed, log)
    test_images, test_labels = extractor_dataset(512, seed + 99)
    torch.save(net.state_dict(), out / "extractor.pt")
    stats = {
        "seed": seed, "n_images": n_images, "batch": batch, "vae_steps": vae_steps, "denoiser_steps": denoiser_steps,
        "extractor_steps": extractor_steps, "vae_loss": vae_loss, "denoiser_loss_ema": denoiser_loss,
        "extractor_loss": ex_loss, "extractor_test_accuracy": dict(zip(("shape", "colour", "background"),
                                                                       extractor_accuracy(net, test_images, test_labels))),
        "seconds": {"vae": t_vae, "denoiser": t_denoiser, "total": time.perf_counter() - started},
        "threads": torch.get_num_threads(),
    }
    (out / "pretrain.json").write_text(json.dumps(stats, indent=2))
    log(f"pretrained in {stats['seconds']['total']:.0f} s; extractor accuracy {stats['extractor_test_accuracy']}")
    return stats
