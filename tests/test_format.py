"""The .safetensors file format: keys, metadata, round trip, portability, clear errors."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from singlora_diffusion import get_step, singlora_modules
from singlora_diffusion.format import load_adapter, read_adapter, save_adapter
from singlora_diffusion.pipelines import load_pipeline, pipeline_components

from .helpers import adapted_pipeline, latents


@pytest.fixture(scope="module")
def saved(tiny_pipeline_dir, tmp_path_factory):
    base = tiny_pipeline_dir("sd15")
    pipe, components, cfg = adapted_pipeline(base)
    path = save_adapter(tmp_path_factory.mktemp("adapter") / "a.safetensors", components, str(base),
                        cfg.target_modules, cfg.text_encoder_target_modules)
    return base, path, latents(pipe), components


def test_keys_dtypes_shapes_and_metadata(saved):
    base, path, _, components = saved
    with safe_open(str(path), framework="pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["format"] == "singlora" and meta["format_version"] == "1"
    assert (meta["rank"], float(meta["alpha"]), meta["ramp_up_steps"], meta["step"]) == ("4", 8.0, "10", "7")
    assert json.loads(meta["target_modules"]) == ["to_q", "to_k", "to_v", "to_out.0"]  # preset "attn" resolved
    assert json.loads(meta["text_encoder_target_modules"]) == ["q_proj", "k_proj", "v_proj", "out_proj"]
    assert meta["base_model"] == str(base)
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.singlora_A" in keys
    # CLIP keys keep `text_model.` whatever transformers' named_modules() says
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.singlora_A" in keys
    tensors = load_file(str(path))
    assert all(t.dtype == torch.float32 for t in tensors.values())
    for path, (d_out, d_in) in [("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", (32, 48)),
                                ("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", (64, 48))]:
        layer = components["unet"].get_submodule(path)
        assert (layer.d_out, layer.d_in) == (d_out, d_in)  # non-square both ways
        assert tensors[f"unet.{path}.singlora_A"].shape == (max(d_in, d_out), 4)
        assert json.loads(meta["module_shapes"])[f"unet.{path}"] == [d_out, d_in]


def test_round_trip_reproduces_outputs_and_step(saved):
    base, path, expected, _ = saved
    pipe = load_pipeline(base)
    plain = latents(pipe)
    components = pipeline_components(pipe)
    load_adapter(components, path)  # no other argument needed
    assert get_step(components["unet"]) == get_step(components["text_encoder"]) == 7
    assert {m.ramp_up_steps for m in singlora_modules(components["unet"]).values()} == {10}
    got = latents(pipe)
    assert (got - plain).abs().max() > 1e-2  # the reloaded adapter is active (u ≠ 0)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_files_without_text_model_prefix_load_too(saved, tmp_path):
    base, path, expected, _ = saved
    tensors = {k.replace(".text_model.", "."): v for k, v in load_file(str(path)).items()}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    meta["module_shapes"] = json.dumps({k.replace(".text_model.", "."): v
                                        for k, v in json.loads(meta["module_shapes"]).items()})
    other = tmp_path / "no_prefix.safetensors"
    save_file(tensors, str(other), metadata=meta)
    pipe = load_pipeline(base)
    load_adapter(pipeline_components(pipe), other)
    torch.testing.assert_close(latents(pipe), expected, rtol=0, atol=0)


def test_wrong_base_fails_with_one_line_naming_key_and_shapes(saved, tmp_path):
    from diffusers import UNet2DConditionModel

    base, path, _, _ = saved
    pipe = load_pipeline(base)
    # Same module names, but a text width of 40 instead of 48: attn2.to_k differs.
    pipe.unet = UNet2DConditionModel.from_config({**pipe.unet.config, "cross_attention_dim": 40})
    components = pipeline_components(pipe)
    before = {k: v.clone() for k, v in components["unet"].state_dict().items()}
    with pytest.raises(ValueError) as e:
        load_adapter(components, path)
    message = str(e.value)
    assert "\n" not in message
    assert ("key unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.singlora_A has shape (48, 4)"
            in message and "Linear(40 -> 32) needs (40, 4)" in message)
    # validated before injecting: the model is untouched
    assert not singlora_modules(components["unet"])
    assert components["unet"].state_dict().keys() == before.keys()


def test_component_missing_from_pipeline_is_named(saved):
    _, path, _, components = saved
    with pytest.raises(ValueError, match="'text_encoder', which this pipeline lacks"):
        load_adapter({"unet": torch.nn.Module()}, path)


def test_only_safetensors_singlora_files_are_read(tmp_path, saved):
    pickle_file = tmp_path / "adapter.safetensors"
    torch.save({"x": torch.zeros(1)}, pickle_file)  # a pickle under a safetensors name
    with pytest.raises(ValueError, match="not a readable .safetensors"):
        read_adapter(pickle_file)
    lora = tmp_path / "lora.safetensors"
    save_file({"unet.x.lora_A.weight": torch.zeros(2, 2)}, str(lora))
    with pytest.raises(ValueError, match="not a SingLoRA file"):
        read_adapter(lora)
    with pytest.raises(FileNotFoundError, match="no SingLoRA adapter"):
        read_adapter(tmp_path / "missing")


def test_generate_refuses_non_safetensors_adapters(tmp_path):
    from singlora_diffusion.format import find_adapter_file

    pt = tmp_path / "adapter.pt"
    torch.save({}, pt)
    with pytest.raises(ValueError, match="only .safetensors"):
        find_adapter_file(pt)
