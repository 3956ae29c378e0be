"""The trainer's loss and step bookkeeping against independent computations.

The loss of a fixed batch is recomputed in float64 from the batch's own random
draws (clean latents, noise, timesteps) and the UNet's prediction, with the noise
schedule, targets and min-SNR weights written from their papers; fp16 skipped
steps are forced with an inf gradient.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from singlora_diffusion.format import read_adapter
from singlora_diffusion.training import TrainConfig, loop, parse_config, train
from singlora_diffusion.training.batches import TrainingData

from .train_helpers import fixed_batch_run, logged_scalars, tiny_config


def scaled_linear_alphas_cumprod(beta_start=0.00085, beta_end=0.012, n=1000) -> torch.Tensor:
    """SD's noise schedule (DDPM with betas linear in sqrt), in float64."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


def reference_loss(x0, noise, t, pred, prediction_type, snr_gamma, n_instance, prior_loss_weight):
    ac = scaled_linear_alphas_cumprod()[t].view(-1, 1, 1, 1)
    target = noise if prediction_type == "epsilon" else ac.sqrt() * noise - (1 - ac).sqrt() * x0  # v (Salimans & Ho)
    mse = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    if snr_gamma is not None:
        snr = (ac / (1 - ac)).view(-1)
        # Hang et al. 2023: min(SNR, γ)/SNR for epsilon, min(SNR, γ)/(SNR + 1) for v
        w = torch.minimum(snr, torch.full_like(snr, snr_gamma)) / (snr if prediction_type == "epsilon" else snr + 1)
        instance = (w[:n_instance] * mse[:n_instance]).mean()
    else:
        instance = mse[:n_instance].mean()
    if mse.shape[0] == n_instance:
        return instance
    return instance + prior_loss_weight * mse[n_instance:].mean()  # the prior loss is never SNR-weighted


@pytest.mark.parametrize("options", [
    dict(),
    dict(snr_gamma=5.0),
    dict(prediction_type="v_prediction", snr_gamma=5.0),
    dict(snr_gamma=5.0, with_prior_preservation=True, prior_loss_weight=0.3),
    dict(prediction_type="v_prediction", with_prior_preservation=True, prior_loss_weight=2.0, train_batch_size=2),
])
def test_loss_of_a_fixed_batch_matches_float64(options, tiny_pipeline_dir, tmp_path, monkeypatch):

    cfg, inputs, accelerator, trainee, objective, draws = fixed_batch_run(tiny_pipeline_dir(), tmp_path, monkeypatch,
                                                                          **options)
    seen = {}
    trainee.pipe.unet.register_forward_hook(
        lambda m, args, out: seen.update(noisy=args[0].double(), t=args[1], pred=out.sample.double()))
    data = TrainingData(cfg, trainee.pipe.vae, inputs.concepts, inputs.items, inputs.class_images,
                        cfg.with_prior_preservation)
    loss, _ = loop.micro_batch_loss(cfg, trainee, accelerator, objective, loop.PromptEncoder(trainee.pipe, True),
                                    data, k=3)
    x0, noise, t = draws[0].latents, draws[0].noise, draws[0].timesteps
    ac = scaled_linear_alphas_cumprod()[t].view(-1, 1, 1, 1)
    # the UNet saw x_t = sqrt(ᾱ_t)·x0 + sqrt(1 - ᾱ_t)·ε (DDPM Eq. 4)
    torch.testing.assert_close(seen["noisy"], ac.sqrt() * x0.double() + (1 - ac).sqrt() * noise.double(),
                               rtol=1e-5, atol=1e-5)
    assert torch.equal(seen["t"].cpu(), t)
    expected = reference_loss(x0.double(), noise.double(), t, seen["pred"], cfg.prediction_type or "epsilon",
                              cfg.snr_gamma, cfg.train_batch_size, cfg.prior_loss_weight)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_offset_noise_is_a_per_channel_constant():
    from singlora_diffusion.training.loss import draw_noise

    torch.manual_seed(1)
    plain = draw_noise((4, 16, 16), 0.0)
    torch.manual_seed(1)
    offset = draw_noise((4, 16, 16), 0.5)
    shift = offset - plain
    assert torch.allclose(shift, shift[:, :1, :1].expand_as(shift))  # one value per channel
    assert shift[:, 0, 0].abs().min() > 0


def test_cosine_schedule_with_warmup_follows_its_formula(tiny_pipeline_dir, tmp_path):
    import math

    out = tmp_path / "run"
    train(tiny_config(tiny_pipeline_dir(), out, max_train_steps=5, lr_scheduler="cosine", lr_warmup_steps=2,
                      learning_rate=1e-3, report_to="tensorboard"))
    logged = [e.value for e in logged_scalars(out)["lr"]]
    # the lr in force after optimizer step t: linear warm-up over 2 steps, then half a cosine to 0 at step 5
    expected = [1e-3 * (t / 2 if t < 2 else 0.5 * (1 + math.cos(math.pi * (t - 2) / 3))) for t in range(1, 6)]
    assert logged == pytest.approx(expected, rel=1e-6, abs=1e-12)


def test_logged_loss_is_the_mean_over_the_accumulated_micro_batches(tiny_pipeline_dir, tmp_path, monkeypatch):
    seen = []
    real = loop.micro_batch_loss

    def spy(*args, **kwargs):
        loss, logs = real(*args, **kwargs)
        seen.append(logs["loss"])
        return loss, logs
    monkeypatch.setattr(loop, "micro_batch_loss", spy)
    out = tmp_path / "run"
    train(tiny_config(tiny_pipeline_dir(), out, max_train_steps=2, gradient_accumulation_steps=3,
                      report_to="tensorboard"))
    assert len(seen) == 6 and len(set(seen)) == 6  # distinct losses: the mean is not any one micro-batch's
    loss = logged_scalars(out)["loss"]
    assert [e.step for e in loss] == [1, 2]
    assert [e.value for e in loss] == pytest.approx([sum(seen[:3]) / 3, sum(seen[3:]) / 3], rel=1e-6)  # float32


class InfGradient(torch.autograd.Function):
    """Identity forward, inf backward: a finite loss whose gradients overflow (as fp16 sometimes does)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def force_inf_gradient_on(monkeypatch, calls: set):
    real = loop.micro_batch_loss
    count = {"n": 0}

    def poisoned(*args, **kwargs):
        count["n"] += 1
        loss, logs = real(*args, **kwargs)
        return (InfGradient.apply(loss) if count["n"] in calls else loss), logs
    monkeypatch.setattr(loop, "micro_batch_loss", poisoned)


def test_fp16_skipped_step_advances_nothing_but_the_data(tiny_pipeline_dir, tmp_path, monkeypatch):
    force_inf_gradient_on(monkeypatch, {2})
    out = tmp_path / "run"
    train(tiny_config(tiny_pipeline_dir(), out, mixed_precision="fp16", max_train_steps=4, checkpointing_steps=4,
                      ramp_up_steps=10, lr_scheduler="linear", report_to="tensorboard"))
    ckpt = out / "checkpoint-4"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert (state["step"], state["samples_seen"]) == (4, 5)  # 5 micro-batches for 4 real steps
    assert read_adapter(out / "singlora_weights.safetensors").step == 4  # u(t) advanced 4 times
    assert torch.load(ckpt / "scheduler.pt", weights_only=True)["last_epoch"] == 4
    assert torch.load(ckpt / "scaler.pt", weights_only=True)["scale"] == 2.0 ** 15  # halved once from 2^16
    lr = logged_scalars(out)["lr"]
    assert [e.step for e in lr] == [1, 2, 3, 4]
    assert [e.value for e in lr] == pytest.approx([7.5e-4, 5e-4, 2.5e-4, 0.0], rel=1e-6, abs=1e-12)  # float32 in TensorBoard


def test_fp16_resume_equals_a_straight_fp16_run(tiny_pipeline_dir, tmp_path, monkeypatch):
    common = dict(mixed_precision="fp16", max_train_steps=6, checkpointing_steps=3, ramp_up_steps=4)
    force_inf_gradient_on(monkeypatch, {2})
    straight = tmp_path / "straight"
    train(tiny_config(tiny_pipeline_dir(), straight, **common))
    force_inf_gradient_on(monkeypatch, set())
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-3", resumed / "checkpoint-3")
    train(tiny_config(tiny_pipeline_dir(), resumed, resume_from_checkpoint="latest", **common))
    a, b = (load_file(str(p / "singlora_weights.safetensors")) for p in (straight, resumed))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    scaler = lambda run: torch.load(run / "checkpoint-6" / "scaler.pt", weights_only=True)
    assert scaler(resumed) == scaler(straight) and scaler(straight)["scale"] == 2.0 ** 15


def test_config_yaml_holds_the_resolved_ramp_and_repeats_the_run(tiny_pipeline_dir, tmp_path):
    first = tmp_path / "first"
    cfg = tiny_config(tiny_pipeline_dir(), first, max_train_steps=3, ramp_up_steps=None)
    train(cfg)
    saved = yaml.safe_load((first / "config.yaml").read_text())
    assert saved["ramp_up_steps"] == 1 and saved["seed"] == 0  # 1 % of 3 steps, at least 1
    again = tmp_path / "again"
    repeat = parse_config(["--config", str(first / "config.yaml"), "--output_dir", str(again)])
    assert repeat == TrainConfig(**{**saved, "output_dir": str(again)})
    train(repeat)
    a, b = (load_file(str(p / "singlora_weights.safetensors")) for p in (first, again))
    assert all(torch.equal(a[k], b[k]) for k in a)


def _fake_checkpoint(folder: Path, **state) -> Path:
    ckpt = folder / "checkpoint-4"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 4, "samples_seen": 4, **state}))
    return ckpt


def test_resuming_with_other_steps_or_ramp_says_what_changes(tmp_path):
    from singlora_diffusion.training.checkpoint import reconcile_resume

    ckpt = _fake_checkpoint(tmp_path, max_train_steps=200, ramp_up_steps=2)
    cfg = tiny_config("unused", tmp_path, max_train_steps=400, ramp_up_steps=None)
    note = reconcile_resume(cfg, ckpt)
    # the default T (1 % of 400 = 4) would drop u from 1 to 0.5 at step 2: the checkpoint's T is kept
    assert cfg.ramp_up_steps == 2
    assert note.count("\n") == 0 and "max_train_steps 200 -> 400" in note and "ramp_up_steps kept at 2" in note
    cfg = tiny_config("unused", tmp_path, max_train_steps=200, ramp_up_steps=10)
    note = reconcile_resume(cfg, ckpt)
    assert cfg.ramp_up_steps == 10 and "ramp_up_steps 2 -> 10 (u at step 4: 1.00 -> 0.40)" in note
    assert "max_train_steps" not in note
    assert reconcile_resume(tiny_config("unused", tmp_path, max_train_steps=200, ramp_up_steps=2), ckpt) is None
