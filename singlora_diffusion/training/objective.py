"""What the denoiser learns to predict, per family (families.Family.objective), and how it is called.

    ddpm  SD1.x/2.x, SDXL. t ~ U{0..999}; x_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·ε (DDPM Eq. 4);
          target ε or v; min-SNR-γ weights on the instance half (loss.snr_weights).
    flow  SD3/3.5, Flux.1: rectified flow (Esser et al. 2024, "Scaling Rectified Flow
          Transformers", Sec. 2-3). A schedule index i is drawn from --weighting_scheme's density
          (diffusers' compute_density_for_timestep_sampling), σ = the base scheduler's sigmas[i]
          (SD3's shift 3 applied; Flux.1's dynamic shift is not, as in diffusers' Flux script);
          x_σ = (1 − σ)·x0 + σ·ε; target ε − x0; each sample weighted by w(σ)
          (compute_loss_weighting_for_sd3), instance and prior samples alike.

One divergence from diffusers' scripts, on purpose: with prior preservation they multiply the
prior half's error by the whole batch's weights (shape 2b against b), which broadcasts to the
wrong sum at batch 1 and fails above it; here every sample carries its own weight.

Each family's forward (FORWARD) takes the noisy latents, the objective's timesteps and the
prompt conditioning (batches.PromptEncoder) and returns the prediction in the latents' layout.
"""
from __future__ import annotations

import torch

from ..errors import BadInput
from ..families import Family
from .loss import per_sample_mse, snr_weights, target_of

# the families' own defaults in diffusers' train_dreambooth_lora_sd3.py / _flux.py
DEFAULT_WEIGHTING = {"sd3": "logit_normal", "flux": "none"}
DEFAULT_MAX_SEQUENCE_LENGTH = {"sd3": 77, "flux": 512}


class DDPMObjective:
    """ε / v prediction on SD's DDPM schedule."""

    def __init__(self, cfg, pipe, family: Family):
        from diffusers import DDPMScheduler

        self.family, self.snr_gamma = family, cfg.snr_gamma
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        if cfg.prediction_type:
            self.scheduler.register_to_config(prediction_type=cfg.prediction_type)

    def draw_timestep(self) -> torch.Tensor:
        """One sample's timestep, from the global RNG (seeded per sample by batches.seed_sample)."""
        return torch.randint(0, self.scheduler.config.num_train_timesteps, ())

    def noisy(self, latents, noise, timesteps):
        return self.scheduler.add_noise(latents, noise, timesteps)

    def model_timesteps(self, timesteps):
        return timesteps

    def errors(self, pred, latents, noise, timesteps) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-sample MSE, and the instance half's weights (None: unweighted)."""
        mse = per_sample_mse(pred, target_of(self.scheduler, latents, noise, timesteps))
        return mse, None if self.snr_gamma is None else snr_weights(self.scheduler, timesteps, self.snr_gamma)


class FlowObjective:
    """Flow matching on the base's FlowMatchEulerDiscreteScheduler: timesteps are schedule indices."""

    def __init__(self, cfg, pipe, family: Family):
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.family = family
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        self.weighting = cfg.weighting_scheme or DEFAULT_WEIGHTING[family.arch]
        self.logit_mean, self.logit_std, self.mode_scale = cfg.logit_mean, cfg.logit_std, cfg.mode_scale
        self.n = self.scheduler.config.num_train_timesteps

    def draw_timestep(self) -> torch.Tensor:
        """One sample's schedule index i (σ = sigmas[i]), from the global RNG."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling(self.weighting, 1, self.logit_mean, self.logit_std, self.mode_scale)
        # u = 1 exactly (possible under "mode") would index one past the schedule
        return (u * self.n).long().clamp(max=self.n - 1)[0]

    def sigmas(self, index, like: torch.Tensor) -> torch.Tensor:
        return self.scheduler.sigmas[index.cpu()].to(like.device, like.dtype).view(-1, *[1] * (like.ndim - 1))

    def noisy(self, latents, noise, index):
        sigma = self.sigmas(index, latents)
        return (1.0 - sigma) * latents + sigma * noise

    def model_timesteps(self, index):
        """The transformer's timestep input: σ·1000 (SD3's scale; FORWARD["flux"] divides by 1000)."""
        return self.scheduler.timesteps[index.cpu()].to(index.device)

    def errors(self, pred, latents, noise, index) -> tuple[torch.Tensor, None]:
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        weights = compute_loss_weighting_for_sd3(self.weighting, self.sigmas(index, latents.float())).view(-1)
        return per_sample_mse(pred, noise - latents) * weights.float(), None


OBJECTIVES = {"ddpm": DDPMObjective, "flow": FlowObjective}


def make_objective(cfg, pipe, family: Family):
    """The family's objective; flags of the other objective are refused, not ignored."""
    check_objective_flags(cfg, family)
    return OBJECTIVES[family.objective](cfg, pipe, family)


def check_objective_flags(cfg, family: Family) -> None:
    if family.objective == "flow":
        wrong = [f for f, v in (("snr_gamma", cfg.snr_gamma), ("prediction_type", cfg.prediction_type)) if v is not None]
        if wrong:
            raise BadInput(f"--{wrong[0]} is for SD1.x/2.x and SDXL (DDPM); {family.pipeline} trains by flow "
                           f"matching: drop it, and set --weighting_scheme instead")
    elif cfg.weighting_scheme is not None:
        raise BadInput(f"--weighting_scheme is for SD3/3.5 and Flux.1 (flow matching); {family.pipeline} trains on "
                       f"DDPM: drop it (--snr_gamma weights its loss)")


# -- each family's forward: noisy latents (b, c, h, w), timesteps, conditioning -> prediction (b, c, h, w)

def _unet(pipe, noisy, t, cond, cfg):
    extra = {}
    if "text_embeds" in cond:  # SDXL: pooled text and micro-conditioning (original size, crop, target size)
        extra = {"added_cond_kwargs": {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}}
    return pipe.unet(noisy, t, cond["encoder_hidden_states"], **extra).sample


def _sd3(pipe, noisy, t, cond, cfg):
    return pipe.transformer(hidden_states=noisy, timestep=t, encoder_hidden_states=cond["encoder_hidden_states"],
                            pooled_projections=cond["pooled_projections"]).sample


def _flux(pipe, noisy, t, cond, cfg):
    """Flux sees 2×2 patches of the latents as tokens (FluxPipeline._pack_latents), with their
    (0, row, column) ids for RoPE, and the timestep in [0, 1]."""
    from diffusers import FluxPipeline

    b, c, h, w = noisy.shape
    transformer = pipe.transformer
    image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)
    guidance = (torch.full((b,), float(cfg.guidance_scale), device=noisy.device)
                if transformer.config.guidance_embeds else None)
    pred = transformer(hidden_states=FluxPipeline._pack_latents(noisy, b, c, h, w), timestep=t / 1000,
                       guidance=guidance, pooled_projections=cond["pooled_projections"],
                       encoder_hidden_states=cond["encoder_hidden_states"], txt_ids=cond["txt_ids"],
                       img_ids=image_ids).sample
    # _unpack_latents takes pixel sizes: latents × the VAE's factor
    return FluxPipeline._unpack_latents(pred, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor,
                                        pipe.vae_scale_factor)


FORWARD = {"sd": _unet, "sdxl": _unet, "sd3": _sd3, "flux": _flux}
