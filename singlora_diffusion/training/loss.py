"""The denoising loss: noise, target (epsilon or v), min-SNR weighting, prior split."""
from __future__ import annotations

import torch
from torch.nn import functional as F


def add_noise(noise_scheduler, latents: torch.Tensor, noise_offset: float):
    noise = torch.randn(latents.shape).to(latents)
    if noise_offset:
        # Offset noise (Guttenberg 2023): a per-channel constant lets the model learn overall brightness.
        noise = noise + noise_offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1).to(latents)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],)).to(latents.device)
    return noise_scheduler.add_noise(latents, noise, timesteps), noise, timesteps


def target_of(noise_scheduler, latents, noise, timesteps) -> torch.Tensor:
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r}")


def per_sample_loss(pred, target, noise_scheduler, timesteps, snr_gamma: float | None) -> torch.Tensor:
    """MSE per sample in float32, min-SNR-γ weighted (Hang et al. 2023, Eq. 9) when snr_gamma is set."""
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma is None:
        return loss
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    weight = torch.clamp(snr, max=snr_gamma)
    # epsilon: min(SNR, γ)/SNR; v-prediction: min(SNR, γ)/(SNR+1)
    weight = weight / (snr + 1 if noise_scheduler.config.prediction_type == "v_prediction" else snr)
    return loss * weight


def dreambooth_loss(per_sample: torch.Tensor, n_instance: int, prior_loss_weight: float) -> tuple[torch.Tensor, dict]:
    """Instance loss + prior_loss_weight × prior loss (batch = instance samples, then class samples)."""
    instance = per_sample[:n_instance].mean()
    if per_sample.shape[0] == n_instance:
        return instance, {"loss": instance.item()}
    prior = per_sample[n_instance:].mean()
    total = instance + prior_loss_weight * prior
    return total, {"loss": total.item(), "loss_instance": instance.item(), "loss_prior": prior.item()}
