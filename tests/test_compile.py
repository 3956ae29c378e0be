"""--compile: torch.compile of the denoiser with the adapters inside trains what eager training trains.

The compiler here is dynamo + AOTAutograd with the eager backend ("aot_eager"): the graph capture,
the guards and the autograd split that --compile relies on, without inductor's C++ build, which
takes minutes on these CPUs (bench/trainer_throughput.py times the real thing).
"""
import pytest
import torch
from safetensors.torch import load_file

from singlora_diffusion.pipelines import compile_denoiser
from singlora_diffusion.training import train

from .train_helpers import tiny_config


@pytest.fixture
def aot_eager(monkeypatch):
    import torch._dynamo

    real = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: real(self, *a, **{**k, "backend": "aot_eager"}))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield torch._dynamo.utils.counters
    torch._dynamo.reset()


def test_compiled_training_matches_eager_through_the_ramp(tiny_pipeline_dir, tmp_path, aot_eager):
    base = tiny_pipeline_dir()
    # T = 2 of 4 steps: u = 0, 1/2, then 1 (the layer's fast path): the ramp must not be baked into the graph
    runs = {}
    for compiled in (False, True):
        out = tmp_path / f"compile_{compiled}"
        train(tiny_config(base, out, ramp_up_steps=2, compile=compiled, validation_prompt=None), model_card=False)
        runs[compiled] = load_file(str(out / "singlora_weights.safetensors"))
    eager, comp = runs[False], runs[True]
    assert eager.keys() == comp.keys() and not any("_orig_mod" in k for k in comp)  # the same file layout
    for k in eager:
        torch.testing.assert_close(comp[k], eager[k], rtol=1e-5, atol=1e-6)
    # Compiled it was, and every block call ran compiled: none fell back to eager at dynamo's
    # recompile limit (the blocks' widths, token counts and input grad make several variants).
    assert aot_eager["stats"]["unique_graphs"] > 0
    assert aot_eager["frames"]["total"] == aot_eager["frames"]["ok"], dict(aot_eager["unimplemented"])


def test_compile_denoiser_uses_regional_compilation_where_diffusers_has_it(monkeypatch):
    from diffusers import SD3Transformer2DModel

    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: calls.append(type(self).__name__))
    from singlora_diffusion.tiny import sd_unet

    unet = sd_unet(32, seed=0, block_out_channels=(32, 64), layers_per_block=1, sample_size=8, attention_head_dim=(2, 4))
    assert compile_denoiser(unet) == "regional (BasicTransformerBlock)"
    assert calls and set(calls) == {"BasicTransformerBlock"}
    calls.clear()
    sd3 = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                pooled_projection_dim=8, out_channels=4)
    assert compile_denoiser(sd3) == "whole model" and calls == ["SD3Transformer2DModel"]
