"""SD3/3.5 and Flux.1 pipelines: the tiny offline builds, their T5 tokenizer, and the target presets.

Preset counts on the full-size transformers (meta device) are derived here from the block layout
the configs describe (blocks, widths, which blocks lack a part), not read back from the code.
"""
import pytest
import torch
from torch import nn

from singlora_diffusion.config import AdapterConfig
from singlora_diffusion.errors import BadInput
from singlora_diffusion.families import base_arch
from singlora_diffusion.pipelines import denoiser, inject_adapters, load_pipeline, pipeline_components
from singlora_diffusion.reference_configs import TRANSFORMER_CONFIGS, meta_transformer
from singlora_diffusion.targets import find_targets
from singlora_diffusion.tiny import t5_tokenizer

R = 16


@pytest.mark.parametrize("arch,cls,encoders", [
    ("sd3", "StableDiffusion3Pipeline", {"transformer", "text_encoder", "text_encoder_2"}),
    ("flux", "FluxPipeline", {"transformer", "text_encoder"}),  # Flux's text_encoder_2 is T5: never adapted
])
def test_tiny_pipelines_load_render_and_offer_their_clip_encoders(arch, cls, encoders, tiny_pipeline_dir):
    pipe = load_pipeline(f"tiny:{arch}")
    assert type(pipe).__name__ == cls and base_arch(denoiser(pipe)) == arch
    assert set(pipeline_components(pipe)) == encoders
    image = pipe("a photo of sks dog", num_inference_steps=2, height=32, width=32, max_sequence_length=16,
                 generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 32, 32, 3) and image.std() > 0
    again = load_pipeline(f"tiny:{arch}")  # built once in the cache, loaded the same
    a, b = denoiser(pipe).state_dict(), denoiser(again).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_tiny_arch_is_refused():
    with pytest.raises(BadInput, match="tiny:sd15 or tiny:sdxl or tiny:sd3 or tiny:flux"):
        load_pipeline("tiny:sd35")


def test_t5_tokenizer_pads_truncates_and_survives_a_save(tmp_path):
    from transformers import AutoTokenizer

    tok = t5_tokenizer()
    ids = tok("a photo of sks dog", padding="max_length", max_length=32, truncation=True).input_ids
    assert len(ids) == 32 and ids[-1] == 0 and 1 in ids  # pad 0 after </s> 1, as T5's
    assert 2 not in ids  # every ASCII character has a piece
    assert len(tok("word " * 100, max_length=16, truncation=True).input_ids) == 16
    tok.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)("a photo of sks dog", padding="max_length", max_length=32,
                                                   truncation=True).input_ids == ids


def test_tiny_layers_have_the_real_shapes_kinds(tiny_pipeline_dir):
    """Joint attention square, feed-forward and Flux single blocks non-square both ways, as at full size."""
    shapes = {}
    for arch in ("sd3", "flux"):
        model = denoiser(load_pipeline(f"tiny:{arch}"))
        for name in find_targets(model, "all", "transformer"):
            shapes[f"{arch}.{name}"] = tuple(model.get_submodule(name).weight.shape)
    assert shapes["sd3.transformer_blocks.0.attn.to_q"] == (32, 32)
    assert shapes["sd3.transformer_blocks.0.attn2.to_k"] == (32, 32)  # SD3.5-medium's second attention
    assert shapes["sd3.transformer_blocks.0.ff.net.0.proj"] == (128, 32)  # d_out > d_in
    assert shapes["sd3.transformer_blocks.0.ff.net.2"] == (32, 128)  # d_in > d_out
    assert shapes["flux.single_transformer_blocks.0.proj_mlp"] == (128, 32)
    assert shapes["flux.single_transformer_blocks.0.proj_out"] == (32, 160)  # attention ⊕ MLP in, width out
    assert "flux.proj_out" not in shapes and "sd3.proj_out" not in shapes  # the final projection stays frozen


def _expected(name: str, preset: str) -> list[tuple[int, int]]:
    """(d_out, d_in) of every layer the preset takes, from the architecture described in words."""
    _, c = TRANSFORMER_CONFIGS[name]
    d = c["num_attention_heads"] * c["attention_head_dim"]
    ff = [(4 * d, d), (d, 4 * d)]  # GELU MLP, ratio 4
    layers = []
    if name.startswith("sd35"):
        blocks, dual = c["num_layers"], len(c.get("dual_attention_layers", ()))
        for b in range(blocks):
            last = b == blocks - 1  # SD3's last block is context_pre_only: no to_add_out, no ff_context
            qk = [(d, d)] * 4  # to_q, to_k, add_q_proj, add_k_proj
            attn = qk + [(d, d)] * (4 if not last else 3)  # to_v, to_out.0, add_v_proj, [to_add_out]
            second = ([(d, d)] * 2 if preset == "paper" else [(d, d)] * 4) if b < dual else []
            layers += (qk if preset == "paper" else attn) + second
            if preset == "all":
                layers += ff + ([] if last else ff)
    else:  # Flux: double blocks like SD3's, single blocks with fused attention + MLP
        for _ in range(c["num_layers"]):
            layers += [(d, d)] * (4 if preset == "paper" else 8) + (ff * 2 if preset == "all" else [])
        for _ in range(c["num_single_layers"]):
            layers += [(d, d)] * (2 if preset == "paper" else 3)  # to_q, to_k, [to_v]; no to_out
            if preset == "all":
                layers += [(4 * d, d), (d, 5 * d)]  # proj_mlp; proj_out over attention ⊕ MLP
    return layers


@pytest.mark.parametrize("name", list(TRANSFORMER_CONFIGS))
@pytest.mark.parametrize("preset", ["paper", "attn", "all"])
def test_preset_counts_on_the_full_size_transformers(name, preset):
    model = meta_transformer(name)
    found = [tuple(model.get_submodule(n).weight.shape) for n in find_targets(model, preset, "transformer")]
    assert sorted(found) == sorted(_expected(name, preset))
    lora, singlora = sum(R * (o + i) for o, i in found), sum(R * max(o, i) for o, i in found)
    # square layers: exactly half of LoRA's parameters; the non-square ones of "all" keep more
    assert singlora / lora == (0.5 if preset != "all" else pytest.approx(singlora / lora)) and singlora / lora >= 0.5


@pytest.mark.parametrize("name,published", [("sd35-medium", 2.24e9), ("sd35-large", 8.1e9), ("flux-dev", 11.9e9)])
def test_full_size_configs_have_the_published_size(name, published):
    n = sum(p.numel() for p in meta_transformer(name).parameters())
    assert n == pytest.approx(published, rel=0.01)


def test_presets_and_their_kinds():
    model = meta_transformer("flux-dev")
    with pytest.raises(BadInput, match="unknown unet target preset 'all'.*preset of transformer models"):
        find_targets(nn.Sequential(nn.Linear(2, 2)), "all", "unet")
    assert AdapterConfig(target_modules="all").target_modules == "all"  # accepted before the base is known
    with pytest.raises(BadInput, match="unknown target preset 'qv'.*all, attn, paper"):
        AdapterConfig(target_modules="qv")
    # T5 never gets an adapter: the text-encoder preset applies to the CLIP towers only
    assert "proj_out" not in find_targets(model, "all", "transformer")


def test_text_encoder_targets_reach_the_clip_towers_only(tiny_pipeline_dir):
    pipe = load_pipeline("tiny:flux")
    injected = inject_adapters(pipeline_components(pipe), AdapterConfig(rank=2, text_encoder_target_modules="attn"))
    assert set(injected) == {"transformer", "text_encoder"}
    assert all("SingLoRA" not in type(m).__name__ for m in pipe.text_encoder_2.modules())


def test_training_freezes_t5(tiny_pipeline_dir, tmp_path):
    from singlora_diffusion.training import build, make_accelerator, validate

    from .train_helpers import tiny_config

    cfg = tiny_config("tiny:sd3", tmp_path, resolution=32, train_text_encoder=True)
    trainee = build(cfg, validate(cfg), make_accelerator(cfg).device)
    assert not any(p.requires_grad for p in trainee.pipe.text_encoder_3.parameters())
    trained = {id(p) for p in trainee.parameters()}
    assert trained and all(id(p) in trained for m in trainee.pipe.components.values() if isinstance(m, nn.Module)
                           for p in m.parameters() if p.requires_grad)


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_web_ui_cost_model_counts_what_the_transformer_computes(arch, tiny_pipeline_dir):
    """The web UI's request budget (webui/budget.py) on these families: FLOPs of one step of the meta-device
    copy against torch's counter on the real transformer, attention as plain matmuls."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from singlora_diffusion.pipelines import native_size
    from singlora_diffusion.webui.budget import CostModel, count_on_meta

    pipe = load_pipeline(f"tiny:{arch}")
    model = CostModel(pipe)
    counted, peak = count_on_meta(model.step_of(model.denoiser, 2, 8, 8))
    t = pipe.transformer
    if arch == "sd3":
        inputs = dict(hidden_states=torch.randn(2, 16, 8, 8), encoder_hidden_states=torch.randn(2, 333, 32),
                      pooled_projections=torch.randn(2, 64), timestep=torch.tensor([10.0, 10.0]))
    else:  # 8x8 latents = 16 tokens of 2x2 patches; 512 T5 tokens
        inputs = dict(hidden_states=torch.randn(2, 16, 64), encoder_hidden_states=torch.randn(2, 512, 32),
                      pooled_projections=torch.randn(2, 32), timestep=torch.tensor([0.5, 0.5]),
                      guidance=torch.tensor([3.5, 3.5]), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(512, 3))
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter, sdpa_kernel(SDPBackend.MATH):
        t(**inputs)
    assert counted == pytest.approx(counter.get_total_flops(), rel=1e-6) and peak > 0
    # Flux's guidance is an input, not a second pass; SD3's classifier-free guidance doubles the batch
    doubled = model.cost(32, 32, 1, 2, 4.0).flops > model.cost(32, 32, 1, 2, 1.0).flops
    assert doubled == (arch == "sd3")
    assert native_size(pipe) == (32 if arch == "sd3" else 256)  # sample size × the tiny VAE's factor 2


def test_web_ui_refuses_sides_the_patches_cannot_take(tiny_pipeline_dir, tmp_path, monkeypatch):
    """With the real VAEs' factor 8, SD3/Flux need sides of 16·k: a 520 px request is refused in one
    line, before any work (diffusers' SD3 pipeline would raise mid-request)."""
    from singlora_diffusion.webui.handlers import generate, open_state
    from singlora_diffusion.webui.requests import BadRequest, GenerateRequest

    state = open_state("tiny:sd3", tmp_path / "adapters", tmp_path / "work")
    monkeypatch.setattr(state.engine.pipe, "vae_scale_factor", 8)
    with pytest.raises(BadRequest, match="width must be divisible by 16 for this StableDiffusion3Pipeline.*520"):
        generate(state, GenerateRequest(prompt="a photo", steps=2, width=520, height=512))


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_evaluation_renders_base_and_adapter_on_the_transformers(arch, tiny_pipeline_dir, tmp_path):
    """eval/evaluate.py on SD3 / Flux: the adapter's images are not the base's (the adapter is applied),
    every image is scored."""
    import json

    import numpy as np
    from PIL import Image

    from singlora_diffusion.bundled import bundled_subject
    from singlora_diffusion.evaluation import run
    from singlora_diffusion.format import save_adapter

    pipe = load_pipeline(f"tiny:{arch}")
    components = pipeline_components(pipe)
    inject_adapters(components, AdapterConfig(rank=4, alpha=64.0))  # a strong adapter at initialisation
    adapter = save_adapter(tmp_path / "a.safetensors", components, f"tiny:{arch}")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a {} on the beach\n")
    out = tmp_path / "report"
    assert run.main(["--adapter", str(adapter), "--base", f"tiny:{arch}", "--subject_dir", str(bundled_subject()),
                     "--prompts", str(prompts), "--baseline", "--out", str(out), "--num_images", "1", "--steps", "2",
                     "--resolution", "32", "--allow_random_weights", "--batch_size", "1"]) == 0
    scores = json.loads((out / "scores.json").read_text())
    assert {m: v["images"] for m, v in scores["overall"]["methods"].items()} == {"base": 1, "adapter": 1}
    base, adapted = (np.asarray(Image.open(next((out / "images" / "dog3" / m).glob("*.png"))), dtype=float)
                     for m in ("base", "adapter"))
    assert base.shape == (32, 32, 3) and np.abs(base - adapted).max() > 1


def test_memory_arithmetic_counts_activations_that_checkpointing_saves(tiny_pipeline_dir):
    """bench/dit_memory.py's activation count on the tiny SD3 transformer: gradient checkpointing holds
    less than keeping every block's activations, and 4x the pixels holds more (both would be equal
    if the count missed the saved tensors)."""
    from bench.dit_memory import activations

    def counted(resolution, checkpointing):
        model = meta_like(denoiser(load_pipeline("tiny:sd3")))
        if checkpointing:
            model.enable_gradient_checkpointing()
        return activations(model.train(), "sd3", resolution, 16)

    assert counted(64, True) < counted(64, False)
    assert counted(64, True) < counted(128, True)


def meta_like(model):
    with torch.device("meta"):
        copy = type(model).from_config(model.config).to(torch.bfloat16)
    inject_adapters({"transformer": copy}, AdapterConfig(rank=2))
    return copy
