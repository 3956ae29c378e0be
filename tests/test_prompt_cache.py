"""Prompts encoded once, text encoders freed: nothing a run produces changes.

When no text encoder trains, a run encodes every prompt it needs (training's, validation's, the
model card's) before fit and drops the pipeline's text encoders, T5 included, as diffusers'
SD3/Flux DreamBooth scripts do. The reference is the pipeline's own path from the prompt string.
"""
import importlib

import pytest
import torch
from safetensors.torch import load_file

from singlora_diffusion.generate import encode_prompt, render
from singlora_diffusion.pipelines import load_pipeline
from singlora_diffusion.training import batches, train

from .train_helpers import tiny_config

TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


@pytest.mark.parametrize("arch", ["sd15", "sdxl", "sd3", "flux"])
def test_rendering_from_cached_embeds_equals_rendering_from_the_string(arch, tiny_pipeline_dir):
    pipe = load_pipeline(tiny_pipeline_dir(arch))
    # guidance 7.5: CFG's negatives; 2 images: SD3's and Flux's pipelines do not repeat given embeddings
    settings = dict(seed=3, steps=2, width=32, height=32, num_images=2, output_type="latent")
    prompt = "a photo of sks dog"
    expected = render(pipe, prompt, **settings)
    with torch.no_grad():  # as the pipeline encodes (T5's kernels differ in the last bits under autograd)
        embeds = encode_prompt(pipe, prompt, guidance=True)
    assert batches.release_text_encoders(pipe)  # rendering must not need them
    assert all(getattr(pipe, n, None) is None for n in TEXT_ENCODERS)
    assert torch.equal(render(pipe, prompt, embeds=embeds, **settings), expected)


def test_a_run_frees_its_text_encoders_and_produces_the_same_files(tiny_pipeline_dir, tmp_path, monkeypatch):
    """Flux (T5 + CLIP-L) with caption dropout, prior preservation and validation: every prompt a run
    needs is served from the cache, and the adapter, validation images and card samples are those of
    a run that keeps its text encoders (--cache_text_embeddings false)."""
    import numpy as np
    from PIL import Image

    freed = []
    real_release = batches.release_text_encoders

    def release(pipe):
        freed.append(pipe)
        return real_release(pipe)
    monkeypatch.setattr(importlib.import_module("singlora_diffusion.training.build"), "release_text_encoders", release)
    class_dir = tmp_path / "class"
    options = dict(resolution=32, max_train_steps=2, caption_dropout_rate=0.5, with_prior_preservation=True,
                   class_prompt="a photo of a dog", num_class_images=1, validation_prompt="sks dog on a beach",
                   validation_steps=2)
    runs = {}
    for cache in (True, False):
        out = tmp_path / f"cache-{cache}"
        files = train(tiny_config(tiny_pipeline_dir("flux"), out, cache_text_embeddings=cache,
                                  class_data_dir=str(class_dir), **options))
        runs[cache] = files, out
    assert len(freed) == 1 and all(getattr(freed[0], n, None) is None for n in TEXT_ENCODERS)
    (cached, out_c), (kept, out_k) = runs[True], runs[False]
    a, b = load_file(cached["adapter"]), load_file(kept["adapter"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pictures = ["samples.png", *(p.relative_to(out_k) for p in sorted((out_k / "validation").glob("*.png")))]
    assert len(pictures) == 2
    for name in pictures:
        assert np.array_equal(np.asarray(Image.open(out_c / name)), np.asarray(Image.open(out_k / name))), name
