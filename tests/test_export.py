"""Export to standard LoRA and merge: (a) injected model, (b) diffusers + exported diffusers
LoRA, (c) diffusers + exported kohya file, (d) the merged folder all render the same latents."""
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from singlora_diffusion.export import export_diffusers, export_kohya, merge_into_pipeline
from singlora_diffusion.format import save_adapter
from singlora_diffusion.pipelines import load_pipeline

from .helpers import adapted_pipeline, latents


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_export_and_merge_are_equivalent(arch, tiny_pipeline_dir, tmp_path):
    base = tiny_pipeline_dir(arch)
    pipe, components, cfg = adapted_pipeline(base)  # step 7 of T = 10: u = 0.7, α/r = 2
    expected = latents(pipe)  # (a)
    plain = latents(load_pipeline(base))
    assert (expected - plain).abs().max() > 0.1  # the adapter changes the output a lot
    adapter = save_adapter(tmp_path / "a.safetensors", components, str(base),
                           cfg.target_modules, cfg.text_encoder_target_modules)

    diffusers_dir = tmp_path / "diffusers"
    export_diffusers(adapter, diffusers_dir)
    pipe_b = load_pipeline(base)
    pipe_b.load_lora_weights(str(diffusers_dir))  # unchanged diffusers API
    torch.testing.assert_close(latents(pipe_b), expected, rtol=0, atol=1e-4)  # (b)

    kohya = export_kohya(adapter, tmp_path / "kohya.safetensors")
    pipe_c = load_pipeline(base)
    pipe_c.load_lora_weights(str(kohya))
    torch.testing.assert_close(latents(pipe_c), expected, rtol=0, atol=1e-4)  # (c)

    merged = merge_into_pipeline(base, adapter, tmp_path / "merged")
    torch.testing.assert_close(latents(load_pipeline(merged)), expected, rtol=1e-4, atol=1e-4)  # (d): fp32 rounding of W0+ΔW, amplified by CFG


@pytest.mark.parametrize("arch,te_prefixes", [("sd15", {"lora_te"}), ("sdxl", {"lora_te1", "lora_te2"})])
def test_kohya_key_layout(arch, te_prefixes, tiny_pipeline_dir, tmp_path):
    base = tiny_pipeline_dir(arch)
    _, components, cfg = adapted_pipeline(base)
    adapter = save_adapter(tmp_path / "a.safetensors", components, str(base), cfg.target_modules,
                           cfg.text_encoder_target_modules)
    tensors = load_file(str(export_kohya(adapter, tmp_path / "k.safetensors")))
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    assert {m.split("_text_model")[0] for m in modules if m.startswith("lora_te")} == te_prefixes
    q = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    assert q in modules
    for m in modules:
        down, up, alpha = tensors[f"{m}.lora_down.weight"], tensors[f"{m}.lora_up.weight"], tensors[f"{m}.alpha"]
        assert down.shape[0] == up.shape[1] == 4 and float(alpha) == 8.0
    first_te = next(iter(sorted(te_prefixes)))
    assert f"{first_te}_text_model_encoder_layers_0_self_attn_q_proj" in modules


def test_diffusers_export_keys_and_exact_factors(tiny_pipeline_dir, tmp_path):
    base = tiny_pipeline_dir("sd15")
    _, components, cfg = adapted_pipeline(base)
    adapter = save_adapter(tmp_path / "a.safetensors", components, str(base), cfg.target_modules,
                           cfg.text_encoder_target_modules)
    path = export_diffusers(adapter, tmp_path / "d")
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    assert {f"unet.{name}.lora_A.weight", f"unet.{name}.lora_B.weight",
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"} <= keys
    # B·A equals ΔW = (α/r)·u·A[:d_out]·A[:d_in]ᵀ in float64
    tensors = load_file(str(path))
    A = components["unet"].get_submodule(name).singlora_A.detach().double()
    ref = 2.0 * 0.7 * A[:32] @ A[:48].T
    got = tensors[f"unet.{name}.lora_B.weight"].double() @ tensors[f"unet.{name}.lora_A.weight"].double()
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch,family,version", [("sd15", "sd", "sd_v1"), ("sdxl", "sdxl", "sdxl_base_v1-0")])
def test_unet_only_adapter_names_its_base_as_kohya_does(arch, family, version, tiny_pipeline_dir, tmp_path):
    """A UNet-only SDXL adapter is still SDXL; A1111 lists an SDXL LoRA only if ss_base_model_version is sdxl_*."""
    base = tiny_pipeline_dir(arch)
    _, components, cfg = adapted_pipeline(base, text_encoders=False)
    adapter = save_adapter(tmp_path / "a.safetensors", {"unet": components["unet"]}, str(base), cfg.target_modules)
    with safe_open(str(adapter), framework="pt") as f:
        meta = f.metadata()
    assert (meta["base_arch"], meta["base_model_version"]) == (family, version)
    with safe_open(str(export_kohya(adapter, tmp_path / "k.safetensors")), framework="pt") as f:
        assert f.metadata()["ss_base_model_version"] == version


def test_sd2_unet_is_sd_v2():
    from diffusers import UNet2DConditionModel

    from singlora_diffusion.targets import base_model_version
    from singlora_diffusion.reference_configs import UNET_CONFIGS

    with torch.device("meta"):  # SD2.x: the OpenCLIP-H text encoder's 1024-wide context
        unet = UNet2DConditionModel(**{**UNET_CONFIGS["sd15"], "cross_attention_dim": 1024,
                                       "attention_head_dim": (5, 10, 20, 20)})
    assert base_model_version(unet) == "sd_v2"
