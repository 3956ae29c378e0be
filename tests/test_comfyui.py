"""The ComfyUI node pack (integrations/comfyui): its glue against a stand-in for ComfyUI's API, and
the conversion it calls for real: per layer, the LoRA pair ComfyUI applies (α/rank·up·down) is the
SingLoRA update (α/r)·u·A[:d_out]·A[:d_in]ᵀ in float64, under the kohya names ComfyUI's key map
knows for SD1.x (lora_unet_…, lora_te_…) and SDXL (lora_te1_…, lora_te2_…)."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from singlora_diffusion.errors import UserError
from singlora_diffusion.export import export_kohya, kohya_state_dict
from singlora_diffusion.format import read_adapter

ROOT = Path(__file__).resolve().parents[1]
PACK = ROOT / "integrations" / "comfyui"

# file module path -> (d_out, d_in): real SD module names, small widths; square and both non-square kinds
SD_LAYERS = {
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (8, 8),
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (8, 12),  # cross-attention: d_in > d_out
    "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.2": (8, 16),
    "unet.up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_out.0": (8, 8),
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": (6, 6),
    "text_encoder.text_model.encoder.layers.1.mlp.fc1": (12, 6),  # d_out > d_in
}
SDXL_LAYERS = {**SD_LAYERS, "text_encoder_2.text_model.encoder.layers.0.self_attn.v_proj": (10, 10)}
# the names ComfyUI's key map gives those layers (comfy/lora.py: model_lora_keys_unet maps
# lora_unet_<diffusers path>, model_lora_keys_clip lora_te_ / lora_te1_ / lora_te2_text_model_encoder_layers_N_…)
UNET_KEYS = [
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2",
    "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn1_to_out_0",
]
KOHYA_KEYS = {
    "sd": UNET_KEYS + ["lora_te_text_model_encoder_layers_0_self_attn_q_proj",
                       "lora_te_text_model_encoder_layers_1_mlp_fc1"],
    "sdxl": UNET_KEYS + ["lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                         "lora_te1_text_model_encoder_layers_1_mlp_fc1",
                         "lora_te2_text_model_encoder_layers_0_self_attn_v_proj"],
}


def write_singlora(path, arch="sd", rank=2, alpha=6.0, step=3, ramp_up_steps=4, seed=0) -> Path:
    """A SingLoRA file as docs/format.md describes it, without building a model: u = step/T = 0.75, α/r = 3."""
    layers = SDXL_LAYERS if arch == "sdxl" else SD_LAYERS
    g = torch.Generator().manual_seed(seed)
    tensors = {f"{k}.singlora_A": torch.randn(max(shape), rank, generator=g) for k, shape in layers.items()}
    meta = {"format": "singlora", "format_version": "1", "rank": str(rank), "alpha": repr(alpha),
            "ramp_up_steps": str(ramp_up_steps), "step": str(step), "target_modules": "[]",
            "text_encoder_target_modules": "null", "base_model": "tiny", "base_arch": arch,
            "base_model_version": "sdxl_base_v1-0" if arch == "sdxl" else "sd_v1",
            "module_shapes": json.dumps({k: list(v) for k, v in layers.items()})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return path


def comfy_delta(tensors, key):
    """ΔW as ComfyUI's "lora" patch applies it at strength 1: up @ down · alpha / rank(down), in float64."""
    up, down = tensors[f"{key}.lora_up.weight"].double(), tensors[f"{key}.lora_down.weight"].double()
    return up @ down * (tensors[f"{key}.alpha"].item() / down.shape[0])


# --- the conversion, for real ------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["sd", "sdxl"])
def test_converted_pairs_are_the_singlora_update_under_comfyui_names(arch, tmp_path):
    path = write_singlora(tmp_path / "a.safetensors", arch)
    tensors, _ = kohya_state_dict(read_adapter(path))
    assert sorted({k.split(".")[0] for k in tensors}) == sorted(KOHYA_KEYS[arch])
    assert len(tensors) == 3 * len(KOHYA_KEYS[arch])  # lora_down, lora_up, alpha: nothing ComfyUI would leave unloaded
    A_of = load_file(str(path))
    layers = SDXL_LAYERS if arch == "sdxl" else SD_LAYERS
    for (module, (d_out, d_in)), key in zip(layers.items(), KOHYA_KEYS[arch]):
        A = A_of[f"{module}.singlora_A"].double()
        expected = (6.0 / 2) * 0.75 * A[:d_out] @ A[:d_in].T  # (α/r)·u·A[:d_out]·A[:d_in]ᵀ
        got = comfy_delta(tensors, key)
        assert got.shape == (d_out, d_in)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


def test_converted_pairs_match_the_trained_layers(tiny_pipeline_dir, tmp_path):
    """The same through a real SD1.5-layout model: each wrapped layer's own delta_weight()."""
    from singlora_diffusion import singlora_modules
    from singlora_diffusion.format import save_adapter

    from .helpers import adapted_pipeline

    _, components, cfg = adapted_pipeline(tiny_pipeline_dir("sd15"))  # u = 0.7, α/r = 2
    path = save_adapter(tmp_path / "a.safetensors", components, "tiny", cfg.target_modules,
                        cfg.text_encoder_target_modules)
    tensors, _ = kohya_state_dict(read_adapter(path))
    prefix = {"unet": "lora_unet", "text_encoder": "lora_te"}
    checked = 0
    for component, model in components.items():
        for name, layer in singlora_modules(model).items():
            name = name if component == "unet" or name.startswith("text_model.") else "text_model." + name
            key = f"{prefix[component]}_{name.replace('.', '_')}"
            torch.testing.assert_close(comfy_delta(tensors, key), layer.delta_weight().detach().double(),
                                       rtol=1e-5, atol=1e-6)
            checked += 1
    assert checked == len(tensors) // 3 and checked > 10


# --- the node, against a stand-in for ComfyUI ---------------------------------------------------------

@pytest.fixture
def comfy(monkeypatch, tmp_path):
    """folder_paths and comfy.sd as ComfyUI has them, recording load_lora_for_models' calls."""
    loras = tmp_path / "models" / "loras"
    loras.mkdir(parents=True)
    calls = []

    def get_full_path_or_raise(folder, name):
        assert folder == "loras"
        if not (loras / name).is_file():
            raise FileNotFoundError(f"Model in folder 'loras' with filename '{name}' not found.")
        return str(loras / name)

    def load_lora_for_models(model, clip, lora, strength_model, strength_clip):
        calls.append({"model": model, "clip": clip, "lora": lora, "strengths": (strength_model, strength_clip)})
        return ("patched", model), ("patched", clip)

    folder_paths = types.ModuleType("folder_paths")
    folder_paths.get_filename_list = lambda folder: sorted(p.name for p in loras.iterdir()) if folder == "loras" else []
    folder_paths.get_full_path_or_raise = get_full_path_or_raise
    comfy_pkg, comfy_sd = types.ModuleType("comfy"), types.ModuleType("comfy.sd")
    comfy_pkg.__path__ = []
    comfy_sd.load_lora_for_models = load_lora_for_models
    comfy_pkg.sd = comfy_sd
    for name, module in (("folder_paths", folder_paths), ("comfy", comfy_pkg), ("comfy.sd", comfy_sd)):
        monkeypatch.setitem(sys.modules, name, module)
    return types.SimpleNamespace(loras=loras, calls=calls)


@pytest.fixture
def pack(comfy):
    """The node pack, imported the way ComfyUI imports a custom_nodes/ folder."""
    name = "singlora_comfyui_under_test"
    spec = importlib.util.spec_from_file_location(name, PACK / "__init__.py", submodule_search_locations=[str(PACK)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]


def test_node_is_registered_with_load_lora_inputs_and_outputs(pack, comfy):
    write_singlora(comfy.loras / "dog.safetensors")
    node = pack.NODE_CLASS_MAPPINGS["LoadSingLoRA"]
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["LoadSingLoRA"] == "Load SingLoRA"
    required = node.INPUT_TYPES()["required"]
    assert list(required) == ["model", "clip", "lora_name", "strength_model", "strength_clip"]
    assert (required["model"][0], required["clip"][0]) == ("MODEL", "CLIP")
    assert required["lora_name"][0] == ["dog.safetensors"]  # ComfyUI's loras folder, via folder_paths
    for strength in ("strength_model", "strength_clip"):
        kind, opts = required[strength]
        assert kind == "FLOAT" and (opts["default"], opts["min"], opts["max"]) == (1.0, -100.0, 100.0)
    assert node.RETURN_TYPES == ("MODEL", "CLIP") and callable(getattr(node(), node.FUNCTION))


def test_node_applies_the_converted_pairs_through_comfyui_patching(pack, comfy):
    path = write_singlora(comfy.loras / "dog.safetensors", "sdxl")
    model, clip = object(), object()
    out = pack.LoadSingLoRA().load_singlora(model, clip, "dog.safetensors", 0.8, -0.5)
    (call,) = comfy.calls
    assert call["model"] is model and call["clip"] is clip and call["strengths"] == (0.8, -0.5)
    assert out == (("patched", model), ("patched", clip))  # ComfyUI's clones, returned as they come
    expected, _ = kohya_state_dict(read_adapter(path))
    assert call["lora"].keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(call["lora"][key], expected[key], rtol=0, atol=0)


def test_zero_strengths_pass_model_and_clip_through(pack, comfy):
    model, clip = object(), object()
    out = pack.LoadSingLoRA().load_singlora(model, clip, "not even there.safetensors", 0.0, 0.0)
    assert out[0] is model and out[1] is clip and comfy.calls == []


def test_a_changed_file_is_converted_again(pack, comfy):
    node = pack.LoadSingLoRA()
    write_singlora(comfy.loras / "dog.safetensors", seed=0)
    node.load_singlora(None, None, "dog.safetensors", 1.0, 1.0)
    path = write_singlora(comfy.loras / "dog.safetensors", seed=1, rank=3)  # another run, same name
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    node.load_singlora(None, None, "dog.safetensors", 1.0, 1.0)
    first, second = (c["lora"] for c in comfy.calls)
    key = UNET_KEYS[0] + ".lora_down.weight"
    assert first[key].shape[0] == 2 and second[key].shape[0] == 3


def test_non_singlora_files_are_refused_with_the_node_to_use(pack, comfy, tmp_path):
    native = write_singlora(tmp_path / "native.safetensors")
    export_kohya(native, comfy.loras / "kohya.safetensors")  # a standard LoRA: ComfyUI's own node loads it
    (comfy.loras / "old.ckpt").write_bytes(b"not opened: pickles are never read")
    (comfy.loras / "junk.safetensors").write_bytes(b"\x00" * 16)
    node = pack.LoadSingLoRA()
    for name, says in (("kohya.safetensors", "is not a SingLoRA file"), ("old.ckpt", "never pickles"),
                       ("junk.safetensors", "not a readable .safetensors file")):
        with pytest.raises(UserError, match=says) as e:
            node.load_singlora(None, None, name, 1.0, 1.0)
        assert name in str(e.value)
        if name != "junk.safetensors":
            assert "Load LoRA" in str(e.value)
    assert comfy.calls == []


# --- how ComfyUI's Python finds the package ----------------------------------------------------------

PRELUDE = textwrap.dedent("""
    import importlib.abc, importlib.util, sys, types
    BLOCKED = set(sys.argv[2].split(","))

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name in BLOCKED or name.split(".")[0] in BLOCKED - {"singlora_diffusion"}:
                raise ImportError(f"{name} is not installed here")

    sys.meta_path.insert(0, Block())
    folder_paths = types.ModuleType("folder_paths")
    folder_paths.get_full_path_or_raise = lambda folder, name: name
    comfy, comfy_sd = types.ModuleType("comfy"), types.ModuleType("comfy.sd")
    comfy.__path__, comfy.sd = [], comfy_sd
    comfy_sd.load_lora_for_models = lambda model, clip, lora, sm, sc: (len(lora), sc)
    sys.modules.update({"folder_paths": folder_paths, "comfy": comfy, "comfy.sd": comfy_sd})
    spec = importlib.util.spec_from_file_location("custom_singlora", sys.argv[1] + "/__init__.py",
                                                  submodule_search_locations=[sys.argv[1]])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["custom_singlora"] = pack
    spec.loader.exec_module(pack)
""")


def run_in_comfyui_python(pack_dir, blocked, body, cwd):
    """Run `body` after importing the pack at `pack_dir` in a fresh Python where `blocked` cannot be imported."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body), str(pack_dir), ",".join(blocked)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_conversion_needs_no_diffusers_transformers_or_peft(tmp_path):
    """ComfyUI's Python has torch and safetensors, not diffusers: the node converts a file without them."""
    path = write_singlora(tmp_path / "dog.safetensors", "sdxl")
    body = f"""
        import json
        out = pack.NODE_CLASS_MAPPINGS["LoadSingLoRA"]().load_singlora("m", "c", {str(path)!r}, 1.0, 0.5)
        print(json.dumps({{"out": out, "loaded": sorted(m for m in ("diffusers", "transformers", "peft",
                                                                     "accelerate") if m in sys.modules)}}))
    """
    result = run_in_comfyui_python(PACK, ["diffusers", "transformers", "peft", "accelerate"], body, tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == {"out": [3 * len(KOHYA_KEYS["sdxl"]), 0.5], "loaded": []}


def test_a_linked_pack_uses_its_own_checkout_without_an_install(tmp_path):
    custom_nodes = tmp_path / "ComfyUI" / "custom_nodes"
    custom_nodes.mkdir(parents=True)
    (custom_nodes / "singlora").symlink_to(PACK, target_is_directory=True)
    body = "print(sys.modules['singlora_diffusion'].__file__)"
    result = run_in_comfyui_python(custom_nodes / "singlora", ["singlora_diffusion"], body, tmp_path)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.splitlines()[-1]) == ROOT / "singlora_diffusion" / "__init__.py"
    # an entry, not a substring: the venv itself may live inside the checkout (.venv/lib/...)
    entries = json.loads(run_in_comfyui_python(custom_nodes / "singlora", ["singlora_diffusion"],
                                               "import json; print(json.dumps(sys.path))", tmp_path).stdout
                         .splitlines()[-1])
    assert str(ROOT) not in entries and str(ROOT.resolve()) not in entries


def test_a_copied_pack_without_the_package_says_how_to_install_it(tmp_path):
    copy = tmp_path / "ComfyUI" / "custom_nodes" / "singlora"
    shutil.copytree(PACK, copy, ignore=shutil.ignore_patterns("__pycache__"))
    result = run_in_comfyui_python(copy, ["singlora_diffusion"], "", tmp_path)
    assert result.returncode != 0
    assert "pip install --no-deps" in result.stderr and "README.md" in result.stderr
