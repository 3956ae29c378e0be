"""The user's real path on the tiny pipelines: fp16 runs end to end, class images from the base."""
import numpy as np
import pytest
import torch
from PIL import Image

from singlora_diffusion.format import read_adapter
from singlora_diffusion.generate import render
from singlora_diffusion.pipelines import load_pipeline
from singlora_diffusion.training.run import train

from .train_helpers import tiny_config


def test_fp16_run_renders_validation_class_images_and_the_card(tiny_pipeline_dir, tmp_path):
    """The VAE stays float32 (force_upcast) beside an fp16 UNet: every render decodes in the VAE's dtype."""
    out, classes = tmp_path / "run", tmp_path / "class"
    files = train(tiny_config(tiny_pipeline_dir(), out, mixed_precision="fp16", max_train_steps=2,
                              validation_prompt="a photo of sks dog", validation_steps=1,
                              with_prior_preservation=True, class_data_dir=str(classes),
                              class_prompt="a photo of dog", num_class_images=1, sample_batch_size=1))
    assert read_adapter(files["adapter"]).step == 2
    assert len(list((out / "validation").glob("step-*.png"))) == 2
    assert len(list(classes.glob("class-*.png"))) == 1
    grid = np.asarray(Image.open(files["samples"]).convert("RGB"), dtype=np.float32)
    assert grid.shape == (128, 64, 3) and grid.std() > 1  # base and adapted rows, real pixels (not NaN-black)
    assert (out / "README.md").is_file() and (out / "pytorch_lora_weights.safetensors").is_file()


def test_class_images_come_from_the_base_model_with_text_encoder_adapters(tiny_pipeline_dir, tmp_path):
    """--train_text_encoder with no ramp: A·Aᵀ is not zero at init, so the text-encoder adapters must be off too."""
    base, classes = tiny_pipeline_dir(), tmp_path / "class"
    cfg = tiny_config(base, tmp_path / "run", train_text_encoder=True, ramp_up_steps=0, max_train_steps=1,
                      with_prior_preservation=True, class_data_dir=str(classes), class_prompt="a photo of dog",
                      num_class_images=1, sample_batch_size=1)
    train(cfg)
    made = torch.tensor(np.asarray(Image.open(classes / "class-00000.png").convert("RGB")), dtype=torch.float32)
    image = render(load_pipeline(base), "a photo of dog", seed=cfg.seed * 1_000_003, steps=cfg.validation_inference_steps,
                   width=cfg.resolution, height=cfg.resolution)[0]
    expected = torch.tensor(np.asarray(image.convert("RGB")), dtype=torch.float32)
    assert (made - expected).abs().max() <= 1  # the plain base model's image (8-bit rounding at most)


def test_sdxl_vae_latents_mean_and_std_are_used_as_diffusers_does(tiny_pipeline_dir):
    """(z − mean)·sf/std for training, as diffusers' SDXL DreamBooth script; the pipeline decodes the inverse."""
    from singlora_diffusion.bundled import bundled_subject
    from singlora_diffusion.pipelines import from_denoiser_latents
    from singlora_diffusion.training.batches import LatentSource
    from singlora_diffusion.images import scan_images

    pipe = load_pipeline(tiny_pipeline_dir("sdxl"))
    mean, std = [0.5, -0.25, 0.125, 1.0], [2.0, 0.5, 1.5, 4.0]
    pipe.vae.register_to_config(latents_mean=mean, latents_std=std)
    source = LatentSource(pipe.vae, scan_images(bundled_subject(), "--instance_data_dir"), 64, True, False, True)
    torch.manual_seed(0)
    z, _ = source.get(0)
    m, s = torch.tensor(mean).view(4, 1, 1), torch.tensor(std).view(4, 1, 1)
    expected = (z.double() - m.double()) * pipe.vae.config.scaling_factor / s.double()
    got = source.scale(z[None])[0]
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(from_denoiser_latents(pipe.vae.config, got[None])[0], z, rtol=1e-5, atol=1e-5)
    pipe.vae.register_to_config(latents_mean=None, latents_std=None)  # SD's VAEs: z·sf only
    torch.testing.assert_close(source.scale(z[None])[0], z * pipe.vae.config.scaling_factor)


@pytest.mark.parametrize("adapter", ["singlora", "lora", "dora"])  # PEFT creates its weights in the base's dtype
def test_fp16_base_is_loaded_in_fp16_and_the_upcast_vae_keeps_its_float32_weights(adapter, tiny_pipeline_dir,
                                                                                   tmp_path):
    from singlora_diffusion.training import build, validate

    cfg = tiny_config(tiny_pipeline_dir(), tmp_path, mixed_precision="fp16", adapter=adapter,
                      train_text_encoder=True)
    trainee = build(cfg, validate(cfg), torch.device("cpu"))
    assert trainee.pipe.unet.dtype == trainee.pipe.text_encoder.dtype == torch.float16
    reference = load_pipeline(tiny_pipeline_dir()).vae.state_dict()
    vae = trainee.pipe.vae.state_dict()
    assert all(vae[k].dtype == torch.float32 and torch.equal(vae[k], reference[k]) for k in reference)  # never rounded
    assert trainee.parameters() and {p.dtype for p in trainee.parameters()} == {torch.float32}
    assert trainee.trained["text_encoder"].get_input_embeddings().weight.dtype == torch.float16  # only adapters cast
