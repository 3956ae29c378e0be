"""Export to standard LoRA and merge: (a) injected model, (b) diffusers + exported diffusers
LoRA, (c) diffusers + exported kohya file, (d) the merged folder all render the same latents."""
import re

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
    # LoRA computes (x·Aᵀ)·Bᵀ, SingLoRA x·ΔWᵀ: float32 rounding through the denoising loop and CFG,
    # measured up to 1.1e-4 on an AMD EPYC (under 1e-4 on Intel).
    torch.testing.assert_close(latents(pipe_b), expected, rtol=0, atol=3e-4)  # (b)

    kohya = export_kohya(adapter, tmp_path / "kohya.safetensors")
    pipe_c = load_pipeline(base)
    pipe_c.load_lora_weights(str(kohya))
    torch.testing.assert_close(latents(pipe_c), expected, rtol=0, atol=3e-4)  # (c)

    merged = merge_into_pipeline(base, adapter, tmp_path / "merged")
    torch.testing.assert_close(latents(load_pipeline(merged)), expected, rtol=1e-4, atol=3e-4)  # (d): fp32 rounding of W0+ΔW, amplified by CFG (as (b))


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

    from singlora_diffusion.families import base_model_version
    from singlora_diffusion.reference_configs import UNET_CONFIGS

    with torch.device("meta"):  # SD2.x: the OpenCLIP-H text encoder's 1024-wide context
        unet = UNet2DConditionModel(**{**UNET_CONFIGS["sd15"], "cross_attention_dim": 1024,
                                       "attention_head_dim": (5, 10, 20, 20)})
    assert base_model_version(unet) == "sd_v2"


# --- kohya metadata: kohya's ss_* keys and the modelspec keys sd-scripts writes for a LoRA ----------------

def kohya_meta(path):
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


@pytest.mark.parametrize("arch,architecture,implementation", [
    ("sd", "stable-diffusion-v1/lora", "diffusers"),
    ("sdxl", "stable-diffusion-xl-v1-base/lora", "https://github.com/Stability-AI/generative-models"),
])
def test_kohya_metadata_carries_the_training_facts(arch, architecture, implementation, tmp_path):
    from datetime import datetime, timezone

    from .test_comfyui import write_singlora

    native = write_singlora(tmp_path / "a.safetensors", arch, rank=2, alpha=6.0, step=3)
    training = {"resolution": 768, "max_train_steps": 300, "output_name": "dog_run", "instance_prompt": "a photo of sks dog",
                "learning_rate": 1e-4}  # not a key export_kohya knows: ignored
    meta = kohya_meta(export_kohya(native, tmp_path / "k.safetensors", training=training))
    version = "sdxl_base_v1-0" if arch == "sdxl" else "sd_v1"
    assert {k: meta[k] for k in meta if k.startswith("ss_")} == {
        "ss_network_module": "networks.lora", "ss_network_dim": "2", "ss_network_alpha": "6.0",
        "ss_base_model_version": version, "ss_v2": "False", "ss_sd_model_name": "tiny",
        "ss_resolution": "(768, 768)", "ss_steps": "3", "ss_max_train_steps": "300", "ss_output_name": "dog_run",
        "ss_training_comment": "SingLoRA (arXiv 2507.05566) adapter as an exactly equivalent LoRA, by "
                               "singlora-diffusion; instance prompt: a photo of sks dog"}
    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    assert (meta["modelspec.architecture"], meta["modelspec.implementation"]) == (architecture, implementation)
    assert (meta["modelspec.title"], meta["modelspec.resolution"]) == ("dog_run", "768x768")
    assert meta["modelspec.trigger_phrase"] == "a photo of sks dog"
    assert meta["modelspec.implementation_version"].startswith("singlora-diffusion/")
    written = datetime.fromtimestamp(int(native.stat().st_mtime), timezone.utc)
    assert datetime.fromisoformat(meta["modelspec.date"]) == written  # when the adapter was written, not exported
    assert not any("learning_rate" in k for k in meta)


@pytest.mark.parametrize("arch,resolution", [("sd", "512x512"), ("sdxl", "1024x1024")])
def test_kohya_metadata_without_training_facts(arch, resolution, tmp_path):
    from .test_comfyui import write_singlora

    native = write_singlora(tmp_path / "a.safetensors", arch)
    first = kohya_meta(export_kohya(native, tmp_path / "my_dog.safetensors"))
    # kohya names its files after --output_name; the modelspec keys the standard requires are always there
    assert (first["ss_output_name"], first["modelspec.title"], first["modelspec.resolution"]) == \
        ("my_dog", "my_dog", resolution)
    assert not {"ss_resolution", "ss_max_train_steps", "modelspec.trigger_phrase"} & set(first)
    assert "instance prompt" not in first["ss_training_comment"]
    assert kohya_meta(export_kohya(native, tmp_path / "my_dog.safetensors")) == first  # same file, same metadata


@pytest.mark.parametrize("resolution,architecture", [(768, "stable-diffusion-v2-768-v/lora"),
                                                     (512, "stable-diffusion-v2-512/lora")])
def test_sd2_kohya_metadata(resolution, architecture, tmp_path):
    """A1111 tells an SD2 LoRA by ss_v2; modelspec names SD2's 768-v base for 768 px training."""
    from safetensors.torch import save_file

    from .test_comfyui import write_singlora

    native = write_singlora(tmp_path / "a.safetensors")
    save_file(load_file(str(native)), str(native), metadata={**kohya_meta(native), "base_model_version": "sd_v2"})
    meta = kohya_meta(export_kohya(native, tmp_path / "k.safetensors", {"resolution": resolution}))
    assert (meta["ss_v2"], meta["ss_base_model_version"], meta["modelspec.architecture"]) == \
        ("True", "sd_v2", architecture)


@pytest.mark.parametrize("training,says", [({"resolution": "512"}, "training['resolution']='512'"),
                                           ({"max_train_steps": 0}, "a whole number >= 1"),
                                           ({"resolution": True}, "training['resolution']=True"),
                                           ({"output_name": 7}, "expected a string")])
def test_kohya_export_refuses_wrong_training_facts(training, says, tmp_path):
    from singlora_diffusion.errors import BadInput

    from .test_comfyui import write_singlora

    native = write_singlora(tmp_path / "a.safetensors")
    with pytest.raises(BadInput, match=re.escape(says)):
        export_kohya(native, tmp_path / "k.safetensors", training=training)
    assert not (tmp_path / "k.safetensors").exists()


@pytest.mark.parametrize("arch,base_arch,says", [("sd", "sd4", "metadata base_arch='sd4'"),
                                                 ("sd", "sd3", "unet adapters on a base_arch='sd3' file"),
                                                 ("sdxl", "sd", "text_encoder_2 adapters on a base_arch='sd' file")])
def test_kohya_export_refuses_a_base_it_cannot_name(arch, base_arch, says, tmp_path):
    from safetensors.torch import save_file

    from singlora_diffusion.errors import BadInput

    from .test_comfyui import write_singlora

    native = write_singlora(tmp_path / "a.safetensors", arch)
    save_file(load_file(str(native)), str(native), metadata={**kohya_meta(native), "base_arch": base_arch})
    with pytest.raises(BadInput, match=re.escape(says)):
        export_kohya(native, tmp_path / "k.safetensors")
