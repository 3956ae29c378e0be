"""The denoising loss: noise, target (epsilon or v), min-SNR weighting, prior split.

Flow matching's target and weights are in objective.py (FlowObjective), from diffusers' own.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F
from ..errors import BadInput


def draw_noise(shape: tuple[int, ...], noise_offset: float) -> torch.Tensor:
    """Noise (c, h, w) for one sample, from the global RNG (seeded per sample)."""
    noise = torch.randn(shape)
    if noise_offset:
        # Offset noise (Guttenberg 2023): a per-channel constant lets the model learn overall brightness.
        noise = noise + noise_offset * torch.randn(shape[0], 1, 1)
    return noise


def target_of(noise_scheduler, latents, noise, timesteps) -> torch.Tensor:
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise BadInput(f"unsupported prediction_type {kind!r}")


def per_sample_mse(pred, target) -> torch.Tensor:
    """MSE per sample, in float32 whatever the model's dtype."""
    return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.dim())))


def snr_weights(noise_scheduler, timesteps, snr_gamma: float) -> torch.Tensor:
    """min-SNR-γ loss weights (Hang et al. 2023, Sec. 3.4 / 4.2) per sample.

    epsilon: min(SNR, γ)/SNR; v-prediction: min(SNR, γ)/(SNR + 1), the paper's
    and diffusers' train_text_to_image.py form (diffusers' DreamBooth scripts
    write min(SNR, γ)/SNR + 1 for v-prediction instead).
    """
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps).float()
    weight = torch.clamp(snr, max=snr_gamma)
    return weight / (snr + 1 if noise_scheduler.config.prediction_type == "v_prediction" else snr)


def dreambooth_loss(mse: torch.Tensor, n_instance: int, prior_loss_weight: float,
                    weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Instance loss + prior_loss_weight × prior loss (batch = instance samples, then class samples).

    min-SNR `weights` apply to the instance half only; the prior loss is the plain
    MSE, as in diffusers' DreamBooth scripts.
    """
    instance = mse[:n_instance] if weights is None else mse[:n_instance] * weights[:n_instance]
    instance = instance.mean()
    if mse.shape[0] == n_instance:
        return instance, {"loss": instance.item()}
    prior = mse[n_instance:].mean()
    total = instance + prior_loss_weight * prior
    return total, {"loss": total.item(), "loss_instance": instance.item(), "loss_prior": prior.item()}
