"""DreamBooth on the diffusion transformers (SD3/3.5, Flux.1), on their tiny offline pipelines.

The flow-matching loss of a fixed batch is recomputed in float64 from the batch's own draws (clean
latents, noise, schedule index) and the transformer's prediction, with σ, the interpolation, the
target and the weights written from the SD3 paper (Esser et al. 2024, Sec. 2-3 and Eq. 20), not
from diffusers. A resumed run equals a straight one; diffusers' own pipelines load the export
with outputs equal to the injected model's.
"""
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from singlora_diffusion.errors import BadInput
from singlora_diffusion.format import load_adapter, read_adapter
from singlora_diffusion.pipelines import load_pipeline, pipeline_components
from singlora_diffusion.training import loop, train
from singlora_diffusion.training.batches import TrainingData

from .train_helpers import fixed_batch_run, tiny_config

DITS = ("sd3", "flux")


def dit_config(base, out, **overrides):
    return tiny_config(base, out, **{"resolution": 32, **overrides})


def shifted_sigma(index: torch.Tensor, shift: float, n: int = 1000) -> torch.Tensor:
    """σ of schedule index i: s = 1 − i/n, shifted s·shift / (1 + (shift − 1)·s) (SD3 paper Sec. 5.3.2)."""
    s = 1 - index.double() / n
    return shift * s / (1 + (shift - 1) * s)


def weight_of(scheme: str, sigma: torch.Tensor) -> torch.Tensor:
    if scheme == "sigma_sqrt":
        return sigma ** -2
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigma + 2 * sigma ** 2))
    return torch.ones_like(sigma)  # logit_normal, mode, none: the density does the weighting


def unpack(tokens: torch.Tensor, b: int, c: int, h: int, w: int) -> torch.Tensor:
    """Flux's 2×2-patch tokens (b, h/2·w/2, 4c) back to latents (b, c, h, w)."""
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


@pytest.mark.parametrize("arch,options", [
    ("sd3", dict()),  # logit_normal, SD3's default
    ("sd3", dict(weighting_scheme="sigma_sqrt", with_prior_preservation=True, prior_loss_weight=0.3)),
    ("sd3", dict(weighting_scheme="cosmap", train_batch_size=2)),
    ("flux", dict()),  # none, Flux's default
    ("flux", dict(weighting_scheme="mode", guidance_scale=2.0, with_prior_preservation=True, prior_loss_weight=2.0,
                  train_batch_size=2)),
])
def test_flow_matching_loss_of_a_fixed_batch_matches_float64(arch, options, tiny_pipeline_dir, tmp_path, monkeypatch):
    cfg, inputs, accelerator, trainee, objective, draws = fixed_batch_run(
        tiny_pipeline_dir(arch), tmp_path, monkeypatch, **{"resolution": 32, **options})
    seen = {}
    trainee.pipe.transformer.register_forward_hook(
        lambda m, args, kwargs, out: seen.update(kwargs, pred=out.sample.double()), with_kwargs=True)
    data = TrainingData(cfg, trainee.pipe.vae, inputs.concepts, inputs.items, inputs.class_images,
                        cfg.with_prior_preservation)
    prompts = loop.PromptEncoder(trainee.pipe, True, 16)
    loss, _ = loop.micro_batch_loss(cfg, trainee, accelerator, objective, prompts, data, k=3)

    x0, noise, index = draws[0].latents.double(), draws[0].noise.double(), draws[0].timesteps
    b, c, h, w = x0.shape
    shift = trainee.pipe.scheduler.config.shift if arch == "sd3" else 1.0  # Flux: dynamic shift, not in training
    sigma = shifted_sigma(index, shift).view(-1, 1, 1, 1)
    noisy, pred, t = seen["hidden_states"].double(), seen["pred"], seen["timestep"].double()
    if arch == "flux":
        noisy, pred = unpack(noisy, b, c, h, w), unpack(pred, b, c, h, w)
        torch.testing.assert_close(t, sigma.view(-1), rtol=1e-5, atol=1e-6)  # Flux takes σ itself
        assert torch.equal(seen["guidance"], torch.full((b,), float(cfg.guidance_scale)))
    else:
        torch.testing.assert_close(t, 1000 * sigma.view(-1), rtol=1e-5, atol=1e-3)  # SD3 takes 1000·σ
    # the transformer saw x_σ = (1 − σ)·x0 + σ·ε (rectified flow, SD3 paper Eq. 2 with a_t = 1 − t, b_t = t)
    torch.testing.assert_close(noisy, (1 - sigma) * x0 + sigma * noise, rtol=1e-5, atol=1e-5)
    mse = ((pred - (noise - x0)) ** 2).mean(dim=(1, 2, 3)) * weight_of(objective.weighting, sigma.view(-1))
    n = cfg.train_batch_size
    expected = mse[:n].mean() + (cfg.prior_loss_weight * mse[n:].mean() if cfg.with_prior_preservation else 0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("arch", DITS)
def test_resume_from_checkpoint_equals_straight_run(arch, tiny_pipeline_dir, tmp_path):
    common = dict(max_train_steps=4, checkpointing_steps=2, ramp_up_steps=3, random_flip=True,
                  train_text_encoder=True, max_sequence_length=16)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(dit_config(tiny_pipeline_dir(arch), straight, **common))
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    train(dit_config(tiny_pipeline_dir(arch), resumed, resume_from_checkpoint="latest", **common))
    final, half = (load_file(str(p / "singlora_weights.safetensors")) for p in (straight, straight / "checkpoint-2"))
    got = load_file(str(resumed / "singlora_weights.safetensors"))
    assert {k.partition(".")[0] for k in got} == {"transformer", "text_encoder"} | ({"text_encoder_2"}
                                                                                     if arch == "sd3" else set())
    assert max((got[k] - final[k]).abs().max().item() for k in final) <= 1e-5
    assert max((got[k] - half[k]).abs().max().item() for k in final) > 1e-4  # steps 3-4 changed A
    assert read_adapter(resumed / "singlora_weights.safetensors").metadata["base_arch"] == arch


@pytest.mark.parametrize("arch", DITS)
def test_diffusers_pipeline_loads_the_export_with_equal_outputs(arch, tiny_pipeline_dir, tmp_path):
    from diffusers import DiffusionPipeline

    out = tmp_path / "run"
    files = train(dit_config(tiny_pipeline_dir(arch), out, max_train_steps=3, learning_rate=2e-2,
                             train_text_encoder=True, max_sequence_length=16))
    kohya = load_file(str(files["kohya"]))  # ComfyUI's layout (tests/test_comfyui_dit.py)
    assert {k.split("_")[1] for k in kohya} == {"transformer", "te1"} | ({"te2"} if arch == "sd3" else set())
    assert f"| ComfyUI (Forge: Flux) | copy `{files['kohya'].name}`" in (out / "README.md").read_text()  # no A1111

    def latents(pipe):
        return pipe("a photo of sks dog", num_inference_steps=2, height=32, width=32, max_sequence_length=16,
                    generator=torch.Generator().manual_seed(0), output_type="latent").images

    ours = load_pipeline(tiny_pipeline_dir(arch))
    before = latents(ours)
    load_adapter(pipeline_components(ours), files["adapter"])
    injected = latents(ours)
    theirs = DiffusionPipeline.from_pretrained(str(tiny_pipeline_dir(arch)))
    theirs.load_lora_weights(str(out))
    assert (injected - before).abs().max() > 1e-3  # the adapter changes the image
    torch.testing.assert_close(latents(theirs), injected, rtol=1e-4, atol=1e-4)


def test_flags_of_the_other_objective_are_refused_before_the_base_loads(tiny_pipeline_dir, tmp_path, monkeypatch):
    import importlib

    build_module = importlib.import_module("singlora_diffusion.training.build")

    monkeypatch.setattr(build_module, "load_pipeline", lambda *a, **k: pytest.fail("the base was loaded"))
    with pytest.raises(BadInput, match="--snr_gamma is for SD1.x/2.x and SDXL.*--weighting_scheme"):
        train(dit_config(tiny_pipeline_dir("flux"), tmp_path / "a", snr_gamma=5.0))
    with pytest.raises(BadInput, match="--prediction_type is for SD1.x/2.x"):
        train(dit_config("tiny:sd3", tmp_path / "a", prediction_type="epsilon"))
    with pytest.raises(BadInput, match="--weighting_scheme is for SD3/3.5 and Flux.1"):
        train(tiny_config(tiny_pipeline_dir(), tmp_path / "b", weighting_scheme="logit_normal"))


@pytest.mark.parametrize("arch", DITS)
def test_image_sides_must_fit_the_patches(arch, tmp_path):
    from types import SimpleNamespace

    from singlora_diffusion.training.build import check_resolution

    pipe = SimpleNamespace(transformer=object(), vae_scale_factor=8)  # the real VAEs' factor: sides of 16·k
    check_resolution(dit_config(f"tiny:{arch}", tmp_path, resolution=512), pipe)
    with pytest.raises(BadInput, match="multiples of 16.*520 is not"):
        check_resolution(dit_config(f"tiny:{arch}", tmp_path, resolution=520), pipe)
    with pytest.raises(BadInput, match="multiples of 16.*; 8 is not"):  # buckets step by 8
        check_resolution(dit_config(f"tiny:{arch}", tmp_path, resolution=512, enable_bucket=True, min_bucket_reso=256,
                                    max_bucket_reso=1024, bucket_reso_steps=8), pipe)


@pytest.mark.parametrize("scheme,mean,std", [("logit_normal", 0.0, 1.0), ("logit_normal", 1.0, 0.5), ("none", 0, 1)])
def test_schedule_indices_follow_the_weighting_schemes_density(scheme, mean, std, tiny_pipeline_dir, tmp_path):
    """i/n is distributed as sigmoid(N(m, s)) for logit_normal (SD3 paper Eq. 19), uniformly for none:
    the Kolmogorov-Smirnov distance of 4000 draws from the float64 CDF stays under 1.36/sqrt(4000) (p = 0.05)."""
    from types import SimpleNamespace

    from singlora_diffusion.families import FAMILIES
    from singlora_diffusion.training.objective import FlowObjective

    pipe = load_pipeline(tiny_pipeline_dir("sd3"))
    cfg = SimpleNamespace(weighting_scheme=scheme, logit_mean=mean, logit_std=std, mode_scale=1.29)
    objective = FlowObjective(cfg, pipe, FAMILIES["sd3"])
    torch.manual_seed(0)
    u = torch.stack([objective.draw_timestep() for _ in range(4000)]).double().sort().values / 1000
    if scheme == "none":
        cdf = u
    else:
        z = (torch.log(u.clamp(1e-9)) - torch.log1p(-u.clamp(max=1 - 1e-9)) - mean) / std
        cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    empirical = torch.arange(1, len(u) + 1, dtype=torch.float64) / len(u)
    # indices are floor(u·n): the CDF at i/n lags by at most one step of 1/n
    assert (empirical - cdf).abs().max() < 1.36 / math.sqrt(len(u)) + 0.002
