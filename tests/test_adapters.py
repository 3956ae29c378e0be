"""adapters.py, the one home for adapter strength and "adapters off", over every adapter kind:
SingLoRA layers, PEFT LoRA baselines, and LoRA files loaded by diffusers.

References: diffusers' own pipe.set_adapters for LoRA files; LoRA's linearity in its scale
(y(s) - y(0) = s·(y(1) - y(0)), in float64) for PEFT layers; the model before any adapter for "off".
"""
import torch

from singlora_diffusion import adapters_off, inject_singlora, set_strength
from singlora_diffusion.baselines import inject_peft
from singlora_diffusion.format import save_adapter
from singlora_diffusion.pipelines import load_pipeline
from singlora_diffusion.tiny import sd_unet
from tests.helpers import adapted_pipeline


def _unet_inputs(unet, seed=1):
    g = torch.Generator().manual_seed(seed)
    side = unet.config.sample_size
    return dict(sample=torch.randn(2, 4, side, side, generator=g), timestep=torch.tensor([10, 500]),
                encoder_hidden_states=torch.randn(2, 5, unet.config.cross_attention_dim, generator=g))


def _out(unet, inputs):
    with torch.no_grad():
        return unet(**inputs).sample


def _randomise_lora_B(model):
    # PEFT initialises lora_B to zero (the update starts at 0); a trained-looking update needs it non-zero.
    g = torch.Generator().manual_seed(3)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.2


def test_strength_of_a_loaded_lora_file_is_what_diffusers_set_adapters_gives(tiny_pipeline_dir, tmp_path):
    from singlora_diffusion.export import export_diffusers

    base = tiny_pipeline_dir("sd15")
    _, components, _ = adapted_pipeline(base)
    native = save_adapter(tmp_path / "a.safetensors", components, str(base), text_encoder_target_modules="attn")
    lora = export_diffusers(native, tmp_path / "lora")
    ids = torch.tensor([[49406, 320, 1125, 49407]])

    def outputs(pipe):
        with torch.no_grad():
            return _out(pipe.unet, _unet_inputs(pipe.unet)), pipe.text_encoder(ids)[0]

    reference, ours = load_pipeline(base), load_pipeline(base)
    for pipe in (reference, ours):
        pipe.load_lora_weights(str(lora), adapter_name="default")
    reference.set_adapters(["default"], adapter_weights=[0.3])
    set_strength(ours, 0.3)
    for got, want in zip(outputs(ours), outputs(reference)):
        assert torch.equal(got, want)
    set_strength(ours, 1.0)  # and strength 1 is the file as written, not 0.3 left behind
    assert not torch.equal(outputs(ours)[0], outputs(reference)[0])


def test_strength_scales_a_peft_baseline_linearly():
    unet = sd_unet(16, seed=0, layers_per_block=1, sample_size=8, plain_last=True)
    inject_peft(unet, ["to_q", "to_v"], rank=4, alpha=8.0)
    _randomise_lora_B(unet)
    layer = unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q").double()
    x = torch.randn(3, layer.in_features, dtype=torch.float64)

    def y(s):
        set_strength({"unet": unet}, s)
        with torch.no_grad():
            return layer(x)
    y0, y1 = y(0.0), y(1.0)
    assert not torch.allclose(y1, y0)
    for s in (0.25, 0.7, 1.4):
        torch.testing.assert_close(y(s) - y0, s * (y1 - y0), rtol=1e-10, atol=1e-12)


def test_adapters_off_is_the_base_model_for_every_kind_at_once_and_restores_each():
    unet = sd_unet(16, seed=0, layers_per_block=1, sample_size=8, plain_last=True)
    inputs = _unet_inputs(unet)
    base = _out(unet, inputs)
    inject_singlora(unet, ["to_q", "to_k"], rank=4, alpha=8.0)
    inject_peft(unet, ["to_v"], rank=4, alpha=8.0)
    _randomise_lora_B(unet)
    with torch.no_grad():  # SingLoRA's ramp-free A is already non-zero; make it large enough to matter
        for name, p in unet.named_parameters():
            if name.endswith("singlora_A"):
                p.mul_(4)
    set_strength({"unet": unet}, 0.5)
    adapted = _out(unet, inputs)
    assert not torch.allclose(adapted, base, atol=1e-4)
    with adapters_off({"unet": unet}):
        assert torch.equal(_out(unet, inputs), base)
    assert torch.equal(_out(unet, inputs), adapted)  # both kinds back, at strength 0.5
