"""The kohya file of an SD3/3.5 or Flux.1 adapter, as ComfyUI loads it.

ComfyUI keeps the original checkpoints' layout, where diffusers' separate to_q / to_k / to_v are
row slices of one fused qkv weight (Flux's single blocks also fuse proj_mlp into linear1). Its key
map, rebuilt below from its source, sends each lora_transformer_<diffusers path> pair to its weight
and row offset. Every exported key must map, and ComfyUI's weights patched as its calculate_weight
does (alpha / rank(down) · up·down added to the slice at the offset) must equal ComfyUI's layout of
the model with ΔW merged, each layer's own delta_weight(), in float64.
"""
import pytest
import torch

from singlora_diffusion import AdapterConfig, set_step, singlora_modules
from singlora_diffusion.export import export_kohya, kohya_metadata, kohya_state_dict
from singlora_diffusion.format import file_module_path, read_adapter, save_adapter
from singlora_diffusion.pipelines import inject_adapters, load_pipeline, pipeline_components

from .test_comfyui import comfy, pack  # noqa: F401 - the stand-in ComfyUI and the node pack


def swap_scale_shift(weight):
    """comfy/utils.py swap_scale_shift: diffusers' AdaLayerNormContinuous keeps (shift, scale), ComfyUI (scale, shift)."""
    shift, scale = weight.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


def sd3_to_comfy(transformer) -> dict:
    """comfy/utils.py mmdit_to_diffusers (Comfy-Org/ComfyUI), weights only: diffusers module path ->
    (ComfyUI weight key, row offset (dim, start, length) or None, function or None).

    ComfyUI's offset is depth·64 with depth = the x_embedder width // 64 (comfy/model_detection.py
    detect_unet_config), and its last block is depth − 1: for every released SD3 model that is the
    hidden width and the block count. The tiny model's width 32 is not a multiple of 64, so the
    width and the block count are taken directly.
    """
    hidden = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    blocks = transformer.config.num_layers
    out = {}
    block_map = {"norm1_context.linear": "context_block.adaLN_modulation.1", "attn.to_add_out": "context_block.attn.proj",
                 "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2",
                 "norm1.linear": "x_block.adaLN_modulation.1", "attn.to_out.0": "x_block.attn.proj",
                 "attn2.to_out.0": "x_block.attn2.proj", "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2"}
    for i in range(blocks):
        src, dst = f"transformer_blocks.{i}", f"diffusion_model.joint_blocks.{i}"
        for j, p in enumerate("qkv"):
            out[f"{src}.attn.to_{p}"] = (f"{dst}.x_block.attn.qkv.weight", (0, j * hidden, hidden), None)
            out[f"{src}.attn.add_{p}_proj"] = (f"{dst}.context_block.attn.qkv.weight", (0, j * hidden, hidden), None)
            out[f"{src}.attn2.to_{p}"] = (f"{dst}.x_block.attn2.qkv.weight", (0, j * hidden, hidden), None)
        for d, c in block_map.items():
            out[f"{src}.{d}"] = (f"{dst}.{c}.weight", None, None)
    basic = {"context_embedder": "context_embedder", "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
             "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
             "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
             "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2", "proj_out": "final_layer.linear"}
    out.update({d: (f"diffusion_model.{c}.weight", None, None) for d, c in basic.items()})
    out["norm_out.linear"] = ("diffusion_model.final_layer.adaLN_modulation.1.weight", None, swap_scale_shift)
    last = blocks - 1
    out[f"transformer_blocks.{last}.norm1_context.linear"] = (
        f"diffusion_model.joint_blocks.{last}.context_block.adaLN_modulation.1.weight", None, swap_scale_shift)
    return out


def flux_to_comfy(transformer) -> dict:
    """comfy/utils.py flux_to_diffusers (Comfy-Org/ComfyUI), weights only, as sd3_to_comfy."""
    h = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    out = {}
    double = {"attn.to_out.0": "img_attn.proj", "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
              "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
              "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2"}
    for i in range(transformer.config.num_layers):
        src, dst = f"transformer_blocks.{i}", f"diffusion_model.double_blocks.{i}"
        for j, p in enumerate("qkv"):
            out[f"{src}.attn.to_{p}"] = (f"{dst}.img_attn.qkv.weight", (0, j * h, h), None)
            out[f"{src}.attn.add_{p}_proj"] = (f"{dst}.txt_attn.qkv.weight", (0, j * h, h), None)
        out.update({f"{src}.{d}": (f"{dst}.{c}.weight", None, None) for d, c in double.items()})
    for i in range(transformer.config.num_single_layers):
        src, dst = f"single_transformer_blocks.{i}", f"diffusion_model.single_blocks.{i}"
        for j, p in enumerate("qkv"):
            out[f"{src}.attn.to_{p}"] = (f"{dst}.linear1.weight", (0, j * h, h), None)
        out[f"{src}.proj_mlp"] = (f"{dst}.linear1.weight", (0, 3 * h, 4 * h), None)  # ComfyUI's mlp_ratio 4
        out[f"{src}.norm.linear"] = (f"{dst}.modulation.lin.weight", None, None)
        out[f"{src}.proj_out"] = (f"{dst}.linear2.weight", None, None)
    basic = {"proj_out": "final_layer.linear", "x_embedder": "img_in", "context_embedder": "txt_in",
             "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
             "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
             "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
             "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
             "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
             "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer"}
    out.update({d: (f"diffusion_model.{c}.weight", None, None) for d, c in basic.items()})
    out["norm_out.linear"] = ("diffusion_model.final_layer.adaLN_modulation.1.weight", None, swap_scale_shift)
    return out


# comfy/lora.py LORA_CLIP_MAP: the CLIP layers model_lora_keys_clip maps, per encoder layer
LORA_CLIP_MAP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
                 "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
                 "self_attn.out_proj": "self_attn_out_proj"}


def comfy_key_map(arch, components) -> dict:
    """LoRA key -> (ComfyUI weight, offset, function) as comfy.sd.load_lora_for_models builds it.

    comfy/lora.py model_lora_keys_unet: for comfy.model_base.SD3 and .Flux, the OneTrainer names
    lora_transformer_<diffusers path with _> of every entry of mmdit_to_diffusers / flux_to_diffusers.
    model_lora_keys_clip: with clip_l present (SD3, Flux) lora_te1_text_model_encoder_layers_N_<layer>
    (and lora_te_…) is CLIP-L and lora_te2_… CLIP-G (SD3); lora_te1_text_projection / lora_te2_text_projection are
    the projections ("OneTrainer SD3 lora"); T5 (t5xxl) is never ours.
    """
    transformer = components["transformer"]
    to_comfy = sd3_to_comfy(transformer) if arch == "sd3" else flux_to_comfy(transformer)
    key_map = {f"lora_transformer_{d.replace('.', '_')}": v for d, v in to_comfy.items()}
    for component, comfy_name, prefix in (("text_encoder", "clip_l", "lora_te1"), ("text_encoder_2", "clip_g", "lora_te2")):
        if component not in components:
            continue
        for b in range(min(components[component].config.num_hidden_layers, 32)):
            for c, lora in LORA_CLIP_MAP.items():
                to = (f"{comfy_name}.transformer.text_model.encoder.layers.{b}.{c}.weight", None, None)
                key_map[f"{prefix}_text_model_encoder_layers_{b}_{lora}"] = to
                if comfy_name == "clip_l":  # CLIP-L also answers to SD1's lora_te_
                    key_map[f"lora_te_text_model_encoder_layers_{b}_{lora}"] = to
        if arch == "sd3":
            key_map[f"{prefix}_text_projection"] = (f"{comfy_name}.transformer.text_projection.weight", None, None)
    return key_map


# every Linear of a CLIP encoder layer (comfy/lora.py LORA_CLIP_MAP); CLIPTextModelWithProjection's
# text_projection is left out: format.file_module_path writes it as text_model.text_projection,
# a path that model has not
CLIP_LAYERS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def adapted(arch, text_targets=CLIP_LAYERS):
    """tiny:<arch> with SingLoRA on every Linear of the transformer (and of the CLIP encoder layers), A scaled up."""
    pipe = load_pipeline(f"tiny:{arch}")
    components = pipeline_components(pipe)
    cfg = AdapterConfig(rank=2, alpha=5.0, target_modules=[".*"],
                        text_encoder_target_modules=list(text_targets) if text_targets else None)
    inject_adapters(components, cfg, ramp_up_steps=4)
    for model in components.values():
        set_step(model, 3)  # u = 0.75, α/r = 2.5
        with torch.no_grad():
            for m in singlora_modules(model).values():
                m.singlora_A.mul_(3)
    return components


def comfy_layout(entries: dict) -> dict:
    """ComfyUI's weights from diffusers module weights: {lora key: (weight, (to, offset, function))}.
    A fused weight is the concatenation of its slices (the inverse of the key map's offsets)."""
    rows = {}
    for w, (to, offset, _) in entries.values():
        rows[to] = max(rows.get(to, 0), offset[1] + offset[2] if offset else w.shape[0])
    out = {}
    for w, (to, offset, function) in entries.values():
        t = out.setdefault(to, torch.full((rows[to], w.shape[1]), float("nan"), dtype=torch.float64))
        t.narrow(0, *offset[1:]).copy_(w) if offset else t.copy_(function(w) if function else w)
    return out


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_every_layer_loads_in_comfyui_with_the_exact_update(arch, tmp_path):
    components = adapted(arch)
    path = save_adapter(tmp_path / "a.safetensors", components, f"tiny:{arch}", [".*"], list(CLIP_LAYERS))
    tensors, _ = kohya_state_dict(read_adapter(path))
    key_map = comfy_key_map(arch, components)

    layers, base, merged = {}, {}, {}  # lora key -> its module's weights, W0 and W0 + ΔW
    prefix = {"transformer": "lora_transformer", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    for component, model in components.items():
        for name, layer in singlora_modules(model).items():
            key = f"{prefix[component]}_{file_module_path(component, name).replace('.', '_')}"
            layers[key] = layer
            w0 = layer.base_layer.weight.detach().double()
            base[key] = (w0, key_map[key])
            merged[key] = (w0 + layer.delta_weight().detach().double(), key_map[key])
    assert {k.split(".")[0] for k in tensors} == set(layers)  # one pair per adapted layer, each mapped
    assert any(k.startswith("lora_te1_") for k in layers) and any(k.startswith("lora_transformer_") for k in layers)

    # comfy/lora.py load_lora + weight_adapter/lora.py LoRAAdapter: x.lora_up.weight, x.lora_down.weight,
    # x.alpha; calculate_weight narrows to the offset and adds function(alpha / rank(down) · up @ down)
    patched, loaded = comfy_layout(base), set()
    for key, (to, offset, function) in ((k, key_map[k]) for k in layers):
        up, down = tensors[f"{key}.lora_up.weight"].double(), tensors[f"{key}.lora_down.weight"].double()
        alpha = tensors[f"{key}.alpha"].item()
        diff = (alpha / down.shape[0]) * (up @ down)
        weight = patched[to].narrow(*offset) if offset else patched[to]
        weight += function(diff) if function else diff
        loaded |= {f"{key}.lora_up.weight", f"{key}.lora_down.weight", f"{key}.alpha"}
    assert loaded == set(tensors)  # nothing ComfyUI would log as "lora key not loaded"
    expected = comfy_layout(merged)
    assert patched.keys() == expected.keys()
    for to in expected:
        assert not expected[to].isnan().any()  # every slice of a fused weight is one of the adapted layers
        torch.testing.assert_close(patched[to], expected[to], rtol=1e-6, atol=1e-7)

    # the fused slices by hand: the key's update lands in the second third of ComfyUI's qkv
    block, fused = (("transformer_blocks.0.attn.to_k", "diffusion_model.joint_blocks.0.x_block.attn.qkv.weight")
                    if arch == "sd3" else
                    ("single_transformer_blocks.0.attn.to_k", "diffusion_model.single_blocks.0.linear1.weight"))
    h = components["transformer"].config.num_attention_heads * components["transformer"].config.attention_head_dim
    k_layer = layers[f"lora_transformer_{block.replace('.', '_')}"]
    got = patched[fused][h:2 * h] - k_layer.base_layer.weight.detach().double()
    torch.testing.assert_close(got, k_layer.delta_weight().detach().double(), rtol=1e-6, atol=1e-7)


def test_flux_t5_adapters_are_refused_by_name(tmp_path):
    """Flux's text_encoder_2 is T5, which ComfyUI maps to lora_te2_ only for T5's own layer names."""
    import json

    from safetensors.torch import save_file

    meta = {"format": "singlora", "format_version": "1", "rank": "2", "alpha": "2.0", "ramp_up_steps": "0",
            "step": "0", "target_modules": "[]", "text_encoder_target_modules": "null", "base_model": "tiny",
            "base_arch": "flux", "base_model_version": "flux1",
            "module_shapes": json.dumps({"text_encoder_2.encoder.block.0.layer.0.SelfAttention.q": [8, 8]})}
    save_file({"text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.singlora_A": torch.ones(8, 2)},
              str(tmp_path / "t5.safetensors"), metadata=meta)
    from singlora_diffusion.errors import BadInput

    with pytest.raises(BadInput, match="text_encoder_2 adapters on a base_arch='flux' file"):
        kohya_state_dict(read_adapter(tmp_path / "t5.safetensors"))


@pytest.mark.parametrize("arch,base,architecture,implementation", [
    ("sd3", "stabilityai/stable-diffusion-3.5-large", "stable-diffusion-3-5-large", "diffusers"),
    ("sd3", "stabilityai/stable-diffusion-3.5-medium", "stable-diffusion-3-5-medium", "diffusers"),
    ("sd3", "stabilityai/stable-diffusion-3-medium-diffusers", "stable-diffusion-3-medium", "diffusers"),
    ("sd3", "tiny:sd3", "stable-diffusion-3", "diffusers"),
    ("flux", "black-forest-labs/FLUX.1-dev", "flux-1-dev", "https://github.com/black-forest-labs/flux"),
    ("flux", "/models/FLUX.1-schnell/", "flux-1-schnell", "https://github.com/black-forest-labs/flux"),
    ("flux", "/dev/models/my-flux", "flux-1", "https://github.com/black-forest-labs/flux"),
])
def test_modelspec_names_the_dit_architecture_at_1024(arch, base, architecture, implementation, tmp_path):
    """kohya sd-scripts library/sai_model_spec.py: determine_architecture ("stable-diffusion-3-" + variant,
    flux-1-dev / flux-1-schnell / flux-1), determine_implementation, determine_resolution (1024 px)."""
    components = adapted(arch, text_targets=None)
    path = save_adapter(tmp_path / "a.safetensors", components, base, ["to_q"], None)
    meta = kohya_metadata(read_adapter(path))
    assert meta["modelspec.architecture"] == f"{architecture}/lora"
    assert meta["modelspec.implementation"] == implementation
    assert meta["modelspec.resolution"] == "1024x1024"
    assert meta["ss_base_model_version"] == {"sd3": "sd3_m", "flux": "flux1"}[arch]
    assert meta["ss_v2"] == "False"


def test_the_node_applies_an_sd3_adapter_through_comfyui(pack, comfy):  # noqa: F811
    components = adapted("sd3")
    path = save_adapter(comfy.loras / "sd3.safetensors", components, "tiny:sd3", [".*"], list(CLIP_LAYERS))
    pack.LoadSingLoRA().load_singlora("model", "clip", "sd3.safetensors", 1.0, 0.5)
    (call,) = comfy.calls
    expected, _ = kohya_state_dict(read_adapter(path))
    assert call["lora"].keys() == expected.keys()
    assert {k.split("_")[1] for k in expected} == {"transformer", "te1", "te2"}


def test_export_kohya_writes_the_comfyui_layout(tmp_path):
    components = adapted("flux")
    path = save_adapter(tmp_path / "a.safetensors", components, "black-forest-labs/FLUX.1-dev", [".*"], list(CLIP_LAYERS))
    out = export_kohya(path, tmp_path / "dog_kohya.safetensors", training={"resolution": 512})
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert keys == set(kohya_state_dict(read_adapter(path))[0])
    assert meta["modelspec.architecture"] == "flux-1-dev/lora" and meta["modelspec.resolution"] == "512x512"
