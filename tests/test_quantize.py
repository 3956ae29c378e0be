"""A quantized frozen base (--quantize_base nf4 | int8, bitsandbytes): QLoRA-style SingLoRA.

diffusers quantizes on a GPU only ("No GPU found" otherwise), so the trainer says so in one line
before the base loads. What runs here: SingLoRA on bitsandbytes' own Linear4bit (its CPU kernels),
against float64 math on top of the layer's own quantized output, and what diffusers resolves from
our quantization config for each component.
"""
import importlib.util

import pytest
import torch

from singlora_diffusion.errors import BadInput, MissingDependency
from singlora_diffusion.families import FAMILIES
from singlora_diffusion.layer import SingLoRALinear
from singlora_diffusion.pipelines import check_quantization, quantization_config
from singlora_diffusion.training import train

from .train_helpers import tiny_config


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_on_a_cpu_the_flag_is_one_clear_error_before_the_base_loads(tiny_pipeline_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(importlib.import_module("singlora_diffusion.training.build"), "load_pipeline",
                        lambda *a, **k: pytest.fail("the base was loaded"))
    with pytest.raises(BadInput, match=r"--quantize_base nf4 needs a CUDA GPU .* drop the flag"):
        train(tiny_config(tiny_pipeline_dir("flux"), tmp_path / "out", resolution=32, quantize_base="nf4"))
    assert not (tmp_path / "out" / "config.yaml").exists()


def test_on_a_gpu_it_needs_bitsandbytes_and_a_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(MissingDependency, match="pip install bitsandbytes"):
        check_quantization("int8", "tiny:flux")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "bitsandbytes" else real(name, *a))
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"")
    with pytest.raises(BadInput, match="is a single file: convert it first"):
        check_quantization("nf4", str(checkpoint))
    check_quantization("none", str(checkpoint))  # no flag, no requirement


@pytest.mark.parametrize("arch,denoiser,t5,clip", [("flux", "transformer", "text_encoder_2", ["text_encoder"]),
                                                   ("sd3", "transformer", "text_encoder_3", ["text_encoder", "text_encoder_2"]),
                                                   ("sdxl", "unet", None, ["text_encoder", "text_encoder_2"])])
def test_the_denoiser_and_t5_are_quantized_clip_and_the_vae_are_not(arch, denoiser, t5, clip):
    """As diffusers' from_pretrained resolves our PipelineQuantizationConfig, component by component."""
    pytest.importorskip("bitsandbytes")  # diffusers checks the backend's version when the config is made
    config = quantization_config("nf4", torch.bfloat16, FAMILIES[arch])
    q = config._resolve_quant_config(is_diffusers=True, module_name=denoiser)
    assert (q.load_in_4bit, q.bnb_4bit_quant_type, q.bnb_4bit_compute_dtype) == (True, "nf4", torch.bfloat16)
    if t5:
        q = config._resolve_quant_config(is_diffusers=False, module_name=t5)
        assert type(q).__module__.startswith("transformers") and q.load_in_4bit
    for name in clip:
        assert config._resolve_quant_config(is_diffusers=False, module_name=name) is None
    assert config._resolve_quant_config(is_diffusers=True, module_name="vae") is None
    q = quantization_config("int8", torch.float16, FAMILIES[arch])._resolve_quant_config(True, denoiser)
    assert q.load_in_8bit and not q.load_in_4bit


def test_singlora_on_a_bitsandbytes_nf4_layer_matches_float64():
    """bitsandbytes' Linear4bit packs its weight into a (d_out·d_in/2, 1) uint8 tensor: the adapter
    takes its sizes from the features, adds coef·x·ΔWᵀ to the quantized layer's own output, trains
    A, and refuses to merge into the packed weight."""
    bnb = pytest.importorskip("bitsandbytes")
    d_in, d_out, rank = 96, 64, 4
    base = bnb.nn.Linear4bit(d_in, d_out, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    base.weight = bnb.nn.Params4bit(torch.randn(d_out, d_in) / d_in ** 0.5, requires_grad=False, quant_type="nf4")
    base = base.to("cpu")  # quantizes
    assert tuple(base.weight.shape) == (d_out * d_in // 2, 1)
    layer = SingLoRALinear(base, rank=rank, alpha=8, ramp_up_steps=0)
    assert (layer.d_out, layer.d_in, tuple(layer.singlora_A.shape)) == (d_out, d_in, (d_in, rank))
    x = torch.randn(5, d_in)
    with torch.no_grad():
        quantized = base(x).double()
    out = layer(x)
    A = layer.singlora_A.detach().double()
    expected = quantized + x.double() @ (8 / rank * A[:d_out] @ A[:d_in].T).T
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    assert layer.singlora_A.grad is not None and layer.singlora_A.grad.abs().sum() > 0
    with pytest.raises(BadInput, match="cannot merge into a quantized layer"):
        layer.merge()
