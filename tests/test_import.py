"""`singlora import` and the layout-aware `singlora inspect`: SingLoRA files of other tools.

Files are built two ways: with the real peft-singlora package, saved the way SimpleTuner saves
(get_peft_model_state_dict, convert_state_dict_to_diffusers for the text encoders, the
pipeline's save_lora_weights with diffusers' collated LoraConfig metadata), and by hand from
the layout's description (every key spelling). Every import is checked against a float64
W0 + (α/r)·u·A[:d_out]·A[:d_in]ᵀ computed from the ORIGINAL file's tensors.
"""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from singlora_diffusion.cli import main
from singlora_diffusion.errors import BadInput
from singlora_diffusion.format import file_module_path, load_adapter, model_module_path, read_adapter
from singlora_diffusion.inject import merge_singlora
from singlora_diffusion.layouts import describe, detect_layout, import_file
from singlora_diffusion.pipelines import load_pipeline, pipeline_components
from singlora_diffusion.targets import COMPONENT_KIND, find_targets

RANK, ALPHA = 4, 8.0
SPELLINGS = ["lora_A", "lora_A.weight", "lora.down", "lora.down.weight", "lora_linear_layer.down",
             "lora_linear_layer.down.weight", "lora_A.default", "lora_A.default.weight"]


def _layers(base, components=("unet", "text_encoder", "text_encoder_2")):
    """(component, model path, Linear) for every attention projection of the base's components."""
    models = pipeline_components(load_pipeline(base))
    for component in components:
        if component in models:
            model = models[component]
            for name in find_targets(model, "attn", COMPONENT_KIND[component]):
                yield component, name, model.get_submodule(name)


def hand_file(path, base, spelling="lora_A.weight", step=None, peft_prefix=False, metadata=True,
              rank=RANK, alpha=ALPHA, components=("unet", "text_encoder", "text_encoder_2"), extra=None):
    """A SimpleTuner / peft-singlora layout file written from the description; returns {(component, name): A}."""
    tensors, original = {}, {}
    gen = torch.Generator().manual_seed(1)
    for component, name, layer in _layers(base, components):
        d_out, d_in = layer.weight.shape
        A = torch.randn(max(d_out, d_in), rank, generator=gen) * 0.3
        key = f"{component}.{'base_model.model.' if peft_prefix else ''}{file_module_path(component, name)}"
        tensors[f"{key}.{spelling}"] = A
        if step is not None:
            tensors[f"{key}.training_step_default"] = torch.tensor(float(step))
        original[(component, name)] = A.double()
    tensors.update(extra or {})
    meta = {"format": "pt"}
    if metadata:
        meta["lora_adapter_metadata"] = json.dumps(
            {f"{c}.{k}": v for c in components for k, v in (("r", rank), ("lora_alpha", alpha), ("peft_type", "LORA"))})
    save_file(tensors, str(path), metadata=meta)
    return original


def check_imported(base, out, original, coef):
    """W0 + ΔW of the imported file, merged into the base, against float64 from the original tensors."""
    components = pipeline_components(load_pipeline(base))
    base_weights = {(c, n): components[c].get_submodule(n).weight.detach().double().clone() for c, n in original}
    adapter = load_adapter(components, out)
    assert len(adapter.tensors) == len(original)
    for model in components.values():
        merge_singlora(model)
    for (component, name), A in original.items():
        W0 = base_weights[(component, name)]
        d_out, d_in = W0.shape
        expected = W0 + coef * A[:d_out] @ A[:d_in].T
        merged = components[component].get_submodule(model_module_path(components[component], component, name))
        assert torch.allclose(merged.base_layer.weight.double(), expected, atol=1e-5), (component, name)


@pytest.fixture(scope="module")
def sdxl(tiny_pipeline_dir):
    return str(tiny_pipeline_dir("sdxl"))


@pytest.fixture(scope="module")
def sd15(tiny_pipeline_dir):
    return str(tiny_pipeline_dir("sd15"))


def test_tiny_sdxl_has_non_square_cross_attention(sdxl):
    shapes = {tuple(layer.weight.shape) for c, n, layer in _layers(sdxl, ["unet"]) if n.endswith("attn2.to_k")}
    assert any(d_out != d_in for d_out, d_in in shapes)


def peft_singlora_file(path, base, step, monkeypatch):
    """A file written by the real peft-singlora 0.2.0, saved as SimpleTuner's save hook saves it."""
    ps = pytest.importorskip("peft_singlora", reason="peft-singlora is not installed (pip install peft-singlora==0.2.0)")
    from diffusers.training_utils import _collate_lora_metadata
    from diffusers.utils import convert_state_dict_to_diffusers
    from diffusers.utils.state_dict_utils import StateDictType
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = load_pipeline(base)
    # setup_singlora() patches LoraConfig.__init__ for the whole process (every later LoRA would be
    # SingLoRA): monkeypatch puts it back after the test
    monkeypatch.setattr(LoraConfig, "__init__", LoraConfig.__init__)
    monkeypatch.setattr(LoraConfig, "_original_init", LoraConfig.__init__, raising=False)
    ps.setup_singlora()  # as SimpleTuner does: PEFT's nn.Linear -> peft_singlora.Linear
    pipe.unet.add_adapter(ps.SingLoRAConfig(r=RANK, lora_alpha=ALPHA, ramp_up_steps=100,
                                            target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for te in (pipe.text_encoder, pipe.text_encoder_2):
        te.add_adapter(ps.SingLoRAConfig(r=RANK, lora_alpha=ALPHA, ramp_up_steps=100,
                                         target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
    layers = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, component)
        ps.update_singlora_global_step(model, step)
        for name, m in model.named_modules():
            if isinstance(m, ps.SingLoRALayer):
                with torch.no_grad():
                    m.lora_A["default"].mul_(3)  # as if trained: far above numerical noise
                layers[(component, name)] = m
    te = lambda model: convert_state_dict_to_diffusers(get_peft_model_state_dict(model), original_type=StateDictType.PEFT)
    type(pipe).save_lora_weights(
        str(path), unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=te(pipe.text_encoder), text_encoder_2_lora_layers=te(pipe.text_encoder_2),
        **_collate_lora_metadata({"unet": pipe.unet, "text_encoder": pipe.text_encoder,
                                  "text_encoder_2": pipe.text_encoder_2}))
    return path / "pytorch_lora_weights.safetensors", layers


def test_real_peft_singlora_file_imports_with_its_step_and_update(sdxl, tmp_path, monkeypatch):
    src, layers = peft_singlora_file(tmp_path / "st", sdxl, step=37, monkeypatch=monkeypatch)
    assert detect_layout(src).kind == "singlora-peft"
    done = import_file(src, sdxl, tmp_path / "out.safetensors")
    # step from the buffers, T = 1000: the layers' own ramp, not the config's 100
    assert (done.settings.step, done.settings.ramp_up_steps, done.loaded) == (37, 1000, len(layers))
    adapter = read_adapter(done.out)
    assert adapter.metadata["base_arch"] == "sdxl" and json.loads(adapter.metadata["text_encoder_target_modules"])
    components = pipeline_components(load_pipeline(sdxl))
    load_adapter(components, done.out)
    for (component, name), m in layers.items():
        ours = components[component].get_submodule(name)  # same base, same module names
        # the package's own ΔW (its _get_update_weight, u = 37/1000) is ours
        theirs = m._get_update_weight("default").detach().double()
        assert torch.allclose(ours.delta_weight().double(), theirs, atol=1e-6), (component, name)


def test_done_when_chain_simpletuner_sdxl_to_kohya(sdxl, tmp_path, monkeypatch):
    """SimpleTuner SDXL file → import → export --to kohya: up·down·alpha/rank = (α/r)·A[:d_out]·A[:d_in]ᵀ."""
    src, _ = peft_singlora_file(tmp_path / "st", sdxl, step=1500, monkeypatch=monkeypatch)  # past the ramp: u = 1
    original = {k: t.double() for k, t in load_file(str(src)).items() if "training_step" not in k}
    assert main(["import", str(src), "--base", sdxl, "--out", str(tmp_path / "n.safetensors")]) == 0
    assert main(["export", str(tmp_path / "n.safetensors"), "--to", "kohya", str(tmp_path / "k.safetensors")]) == 0
    kohya = load_file(str(tmp_path / "k.safetensors"))
    shapes = {f"{c}.{file_module_path(c, n)}": tuple(l.weight.shape) for c, n, l in _layers(sdxl)}
    prefix = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    assert len(original) == len(kohya) // 3 == len(shapes)
    for key, A in original.items():
        component, _, path = key.rsplit(".lora_", 1)[0].partition(".")
        path = file_module_path(component, path)  # diffusers writes text_encoder's keys without `text_model.`
        d_out, d_in = shapes[f"{component}.{path}"]
        k = f"{prefix[component]}_{path.replace('.', '_')}"
        up, down, alpha = (kohya[f"{k}.{s}"].double() for s in ("lora_up.weight", "lora_down.weight", "alpha"))
        assert torch.allclose(up @ down * alpha / down.shape[0], ALPHA / RANK * A[:d_out] @ A[:d_in].T, atol=1e-6), key


@pytest.mark.parametrize("spelling,peft_prefix,step", [
    ("lora_A", False, 37), ("lora_A.weight", False, None), ("lora.down", False, None),
    ("lora.down.weight", True, 37), ("lora_linear_layer.down", False, 37),
    ("lora_linear_layer.down.weight", False, None), ("lora_A.default", True, None),
    ("lora_A.default.weight", False, 37)])
def test_hand_built_layouts_import_exactly(sdxl, tmp_path, spelling, peft_prefix, step):
    src = tmp_path / "in.safetensors"
    original = hand_file(src, sdxl, spelling, step=step, peft_prefix=peft_prefix)
    done = import_file(src, sdxl, tmp_path / "out.safetensors")
    u = 37 / 1000 if step is not None else 1.0  # no step buffer: a finished training, u = 1
    assert done.settings.u == pytest.approx(u)
    check_imported(sdxl, done.out, original, ALPHA / RANK * u)


def test_step_flags_set_u_when_there_is_no_buffer(sd15, tmp_path):
    src = tmp_path / "in.safetensors"
    original = hand_file(src, sd15, components=("unet", "text_encoder"))
    done = import_file(src, sd15, tmp_path / "out.safetensors", step=3, ramp_up_steps=12)
    assert (done.settings.step, done.settings.ramp_up_steps) == (3, 12)
    check_imported(sd15, done.out, original, ALPHA / RANK * 3 / 12)


def test_flags_give_rank_and_alpha_the_metadata_lacks(sd15, tmp_path):
    src = tmp_path / "in.safetensors"
    original = hand_file(src, sd15, metadata=False, components=("unet",))
    with pytest.raises(BadInput, match=f"{src}.*--rank {RANK} --alpha"):
        import_file(src, sd15, tmp_path / "out.safetensors")
    done = import_file(src, sd15, tmp_path / "out.safetensors", rank=RANK, alpha=2.0)
    check_imported(sd15, done.out, original, 2.0 / RANK)


def test_native_file_imports_as_itself(sd15, tmp_path):
    from tests.helpers import adapted_pipeline
    from singlora_diffusion.format import save_adapter

    _, components, cfg = adapted_pipeline(sd15)
    native = save_adapter(tmp_path / "a.safetensors", components, sd15, cfg.target_modules,
                          cfg.text_encoder_target_modules)
    done = import_file(native, sd15, tmp_path / "b.safetensors")
    a, b = read_adapter(native), read_adapter(done.out)
    assert (b.rank, b.alpha, b.step, b.ramp_up_steps) == (a.rank, a.alpha, a.step, a.ramp_up_steps)
    assert a.tensors.keys() == b.tensors.keys() and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


# ------------------------------------------------------------------------------ refusals


def _refused(src, base, out, match, **flags):
    with pytest.raises(BadInput, match=match) as e:
        import_file(src, base, out, **flags)
    assert str(src) in str(e.value)  # every refusal names the file
    assert not out.exists()


def test_refusals_before_the_base_loads(sd15, tmp_path, monkeypatch):
    import singlora_diffusion.pipelines as pipelines

    monkeypatch.setattr(pipelines, "load_pipeline", lambda *a, **k: pytest.fail("the base loaded first"))
    out = tmp_path / "out.safetensors"
    # a standard LoRA: up/B partners
    lora = tmp_path / "lora.safetensors"
    save_file({"unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.ones(4, 64),
               "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.ones(64, 4)}, str(lora))
    _refused(lora, sd15, out, "standard LoRA.*singlora generate")
    # NaN
    key = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 4})}
    bad = tmp_path / "nan.safetensors"
    save_file({key: torch.full((64, 4), float("nan"))}, str(bad), metadata=meta)
    _refused(bad, sd15, out, "NaN/Inf")
    # rank in the metadata (or a flag) contradicting the tensors
    wrong_rank = tmp_path / "rank.safetensors"
    save_file({key: torch.ones(64, 4)}, str(wrong_rank),
              metadata={"lora_adapter_metadata": json.dumps({"unet.r": 8, "unet.lora_alpha": 8})})
    _refused(wrong_rank, sd15, out, "rank 8 .from its metadata. contradicts its tensors, which are rank 4")
    _refused(wrong_rank, sd15, out, "rank 2 .from --rank. contradicts", rank=2)
    # components that disagree, step buffers that disagree, keys of no known layout
    mixed = tmp_path / "mixed.safetensors"
    save_file({key: torch.ones(64, 4)}, str(mixed),
              metadata={"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 4,
                                                             "text_encoder.r": 4, "text_encoder.lora_alpha": 8})})
    _refused(mixed, sd15, out, "differ in lora_alpha.*--alpha")
    steps = tmp_path / "steps.safetensors"
    save_file({key: torch.ones(64, 4), key.replace("to_q.lora_A.weight", "to_q.training_step_default"): torch.tensor(3.),
               key.replace("to_q", "to_k"): torch.ones(64, 4),
               key.replace("to_q.lora_A.weight", "to_k.training_step_default"): torch.tensor(5.)}, str(steps), metadata=meta)
    _refused(steps, sd15, out, r"step buffers disagree \(3 … 5\).*--step N")
    other = tmp_path / "other.safetensors"
    save_file({"model.diffusion_model.input_blocks.1.weight": torch.ones(2, 2)}, str(other))
    _refused(other, sd15, out, "not an adapter layout singlora reads")


def test_refuses_keys_that_fit_no_layer_unless_partial(sd15, sdxl, tmp_path):
    src = tmp_path / "sd15.safetensors"
    hand_file(src, sd15, components=("unet",))
    _refused(src, sdxl, tmp_path / "out.safetensors", r"of its \d+ keys fit no layer of this base")
    # one key that names no layer, and one of the wrong shape
    good = tmp_path / "partial.safetensors"
    extra = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_nothing.lora_A.weight": torch.ones(32, 4),
             "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_zz.lora_A.weight": torch.ones(7, 4)}
    original = hand_file(good, sd15, components=("unet",), extra=extra)
    _refused(good, sd15, tmp_path / "out.safetensors", r"2 of its \d+ keys fit no layer.*--allow_partial")
    done = import_file(good, sd15, tmp_path / "out.safetensors", allow_partial=True)
    assert done.loaded == len(original) and len(done.skipped) == 2
    check_imported(sd15, done.out, original, ALPHA / RANK)


def test_wrong_shape_for_the_base_is_refused(sd15, tmp_path):
    src = tmp_path / "shape.safetensors"
    name = next(n for c, n, _ in _layers(sd15, ["unet"]))
    hand_file(src, sd15, components=("unet",),
              extra={f"unet.{name}.lora_A.weight": torch.ones(5, RANK)})  # replaces a layer's A with 5 rows
    _refused(src, sd15, tmp_path / "out.safetensors", r"has shape \(5, 4\) but this base's Linear")


# ------------------------------------------------------------------------------ inspect and the CLI


def test_inspect_names_each_layout(sd15, tmp_path, capsys):
    from tests.helpers import adapted_pipeline
    from singlora_diffusion.export import export_diffusers, export_kohya
    from singlora_diffusion.format import save_adapter

    _, components, cfg = adapted_pipeline(sd15)
    native = save_adapter(tmp_path / "a.safetensors", components, sd15, cfg.target_modules,
                          cfg.text_encoder_target_modules)
    peft_lora = tmp_path / "peft.safetensors"
    save_file({"base_model.model.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.ones(4, 64),
               "base_model.model.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.ones(64, 4)},
              str(peft_lora))
    hand = tmp_path / "hand.safetensors"
    hand_file(hand, sd15, step=500, components=("unet", "text_encoder"))
    files = {"native": native, "diffusers LoRA": export_diffusers(native, tmp_path / "d"),
             "kohya LoRA": export_kohya(native, tmp_path / "k.safetensors"), "PEFT LoRA": peft_lora,
             "SimpleTuner / peft-singlora": hand}
    for name, path in files.items():
        assert main(["inspect", str(path)]) == 0
        out = capsys.readouterr().out
        assert f"layout: {name}" in out or f"layout: SingLoRA, {name}" in out, out
        assert "rank: 4" in out
    assert main(["inspect", str(hand)]) == 0
    out = capsys.readouterr().out
    assert "alpha: 8" in out and "500 (step buffers); u = 0.5" in out
    unet = sum(k.startswith("unet.") and "lora_A" in k for k in load_file(str(hand)))
    assert f"unet: {unet} modules (to_k, to_out.0, to_q, to_v)" in out and "text_encoder: 20 modules" in out


@pytest.mark.parametrize("width,arch", [(768, "sd15"), (1024, "sd2"), (2048, "sdxl")])
def test_inspect_tells_the_base_from_cross_attention_width(tmp_path, width, arch):
    """A full-size file needs no base: attn2.to_k's input width is the text encoder's."""
    src = tmp_path / "f.safetensors"
    key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight"
    save_file({key: torch.ones(max(width, 640), 4)}, str(src))
    assert describe(detect_layout(src))["fits"].startswith(arch)


def test_cli_import_prints_the_step_notice(sd15, tmp_path, capsys):
    src = tmp_path / "in.safetensors"
    hand_file(src, sd15, components=("unet",))
    out = tmp_path / "out.safetensors"
    assert main(["import", str(src), "--base", sd15, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "no step buffer" in captured.err and "u = 1" in captured.err
    assert f"to {out}" in captured.out and read_adapter(out).step == 1000
    assert main(["import", str(tmp_path / "missing.safetensors"), "--base", sd15, "--out", str(out)]) == 2
    assert "missing.safetensors" in capsys.readouterr().err


def test_peft_singlora_leaves_peft_as_it_was():
    """After the real-package tests (above, same process): setup_singlora's patch of LoraConfig is undone,
    or every later LoRA file diffusers loads (test_cli's generate) would get SingLoRA layers."""
    from peft import LoraConfig

    assert not hasattr(LoraConfig, "_original_init") and LoraConfig.__init__.__name__ != "_patched_init"
