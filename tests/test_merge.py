"""`singlora merge` outputs that every tool opens: the diffusers folder in the hub's key layout
(transformers 4, ComfyUI's diffusers loader) and the original-layout single file (A1111,
Forge, ComfyUI's checkpoint loader), each loaded back with diffusers and compared weight by weight."""
import pytest
import torch
from safetensors import safe_open

from singlora_diffusion.cli import main
from singlora_diffusion.errors import BadInput
from singlora_diffusion.export import merge_to_single_file, merged_pipeline
from singlora_diffusion.format import save_adapter
from singlora_diffusion.pipelines import load_pipeline

from .helpers import adapted_pipeline

COMPONENTS = {"sd15": ("unet", "vae", "text_encoder"), "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2")}


@pytest.fixture(scope="module")
def adapter(tiny_pipeline_dir, tmp_path_factory):
    """adapter("sd15") -> (base folder, adapter file on UNet and text encoders)."""
    cache = {}

    def get(arch):
        if arch not in cache:
            base = tiny_pipeline_dir(arch)
            _, components, cfg = adapted_pipeline(base)
            cache[arch] = base, save_adapter(tmp_path_factory.mktemp(f"merge_{arch}") / "a.safetensors", components,
                                             str(base), cfg.target_modules, cfg.text_encoder_target_modules)
        return cache[arch]
    return get


@pytest.fixture(scope="module")
def merged(adapter):
    """The merged pipeline in memory (fp32 unless asked): what every file must hold."""
    cache = {}

    def get(arch, dtype=torch.float32):
        if (arch, dtype) not in cache:
            cache[arch, dtype] = merged_pipeline(*adapter(arch), dtype=dtype)
        return cache[arch, dtype]
    return get


def keys(path):
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def assert_same_weights(loaded, expected, arch, base=None):
    """Every weight of every component equal; with `base` (the unmerged fp32 pipeline), within fp16 rounding."""
    for name in COMPONENTS[arch]:
        got, want = getattr(loaded, name).state_dict(), getattr(expected, name).state_dict()
        assert set(got) == set(want), name
        for key, value in want.items():
            if base is None:
                assert got[key].dtype == value.dtype and torch.equal(got[key], value), f"{name}.{key}"
                continue
            # W0 rounded to fp16 on load, then W0 + ΔW rounded once: half an fp16 ulp (2^-11 relative) of each
            w0 = getattr(base, name).state_dict()[key]
            bound = 2 ** -10 * torch.maximum(value.abs(), w0.abs()) + 2 ** -24
            assert ((got[key].float() - value).abs() <= bound).all(), f"{name}.{key}"


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_folder_has_the_hub_text_encoder_layout_and_loads_back_exactly(arch, adapter, merged, tmp_path):
    from diffusers import DiffusionPipeline

    base, path = adapter(arch)
    out = tmp_path / "m"
    assert main(["merge", "--base", str(base), "--adapter", str(path), "--out", str(out)]) == 0
    for name in COMPONENTS[arch][2:]:
        files = list((out / name).glob("*.safetensors"))
        assert [f.name for f in files] == ["model.safetensors"]  # one file: ComfyUI reads no shard index
        names = keys(files[0])
        assert names and all(k.startswith("text_model.") for k in names if k != "text_projection.weight"), name
    assert "text_model.encoder.layers.0.mlp.fc1.weight" in keys(out / "text_encoder" / "model.safetensors")  # ComfyUI's CLIP-L probe
    assert_same_weights(DiffusionPipeline.from_pretrained(str(out)), merged(arch), arch)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_single_file_loads_back_in_diffusers(arch, precision, adapter, merged, tmp_path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    base, path = adapter(arch)
    out = tmp_path / "merged.safetensors"
    argv = ["merge", "--base", str(base), "--adapter", str(path), "--single_file", str(out)]
    assert main(argv + (["--dtype", "fp32"] if precision == "fp32" else [])) == 0  # fp16 is the default
    names = keys(out)
    prefixes = {"sd15": ["model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model."],
                "sdxl": ["model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.transformer.text_model.",
                         "conditioner.embedders.1.model."]}[arch]
    assert {next(p for p in prefixes if k.startswith(p)) for k in names} == set(prefixes)
    if arch == "sdxl":  # OpenCLIP's fused attention and transposed projection, as sgm and ComfyUI read them
        assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in names
        assert "conditioner.embedders.1.model.text_projection" in names
    cls = StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline
    dtype = torch.float32 if precision == "fp32" else torch.float16
    loaded = cls.from_single_file(str(out), config=str(base), torch_dtype=dtype)  # offline: the base's configs
    assert_same_weights(loaded, merged(arch, dtype), arch)  # what the merge computed in that dtype, exactly
    if precision == "fp16":
        assert_same_weights(loaded, merged(arch), arch, base=load_pipeline(base))


def test_single_file_refusals_before_the_base_loads(adapter, tmp_path, monkeypatch, capsys):
    import singlora_diffusion.export as export

    base, path = adapter("sd15")
    monkeypatch.setattr(export, "merged_pipeline", lambda *a, **k: pytest.fail("the base must not load"))
    (tmp_path / "notes.safetensors").write_text("my notes")
    for out, message in [(tmp_path / "x.ckpt", "give a .safetensors file name"),
                         (tmp_path / "notes.safetensors", "exists and is not an SD checkpoint")]:
        assert main(["merge", "--base", str(base), "--adapter", str(path), "--single_file", str(out)]) == 2
        assert message in capsys.readouterr().err
    assert (tmp_path / "notes.safetensors").read_text() == "my notes"
    assert main(["merge", "--base", str(base), "--adapter", str(path), "--single_file", str(tmp_path / "y.safetensors"),
                 "--dtype", "fp16", "--save_precision", "fp32"]) == 2
    assert "disagree" in capsys.readouterr().err


def test_single_file_checks_the_adapter_first_and_refuses_overflow(adapter, tmp_path, monkeypatch):
    import singlora_diffusion.pipelines as pipelines

    base, path = adapter("sd15")
    (tmp_path / "bad.safetensors").write_bytes(b"\0" * 16)
    with monkeypatch.context() as m:
        m.setattr(pipelines, "load_pipeline", lambda *a, **k: pytest.fail("the base must not load"))
        with pytest.raises(BadInput):
            merge_to_single_file(base, tmp_path / "bad.safetensors", tmp_path / "out.safetensors")
    out = tmp_path / "out.safetensors"
    merge_to_single_file(base, path, out)
    before = out.read_bytes()
    with pytest.raises(BadInput, match="not finite in torch.float16.*--dtype fp32"):
        merge_to_single_file(base, path, out, scale=1e30)
    assert out.read_bytes() == before  # an earlier checkpoint is left as it was, and may be replaced
    merge_to_single_file(base, path, out, scale=0.5)
    assert out.read_bytes() != before


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_real_size_layout_on_the_meta_device(arch):
    """The real SD1.5 / SDXL architectures (no weights): names the original checkpoints use, and
    diffusers' converters give every key and shape back (original_state_dict checks that)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from singlora_diffusion.reference_configs import CLIP_BIGG, CLIP_L, UNET_CONFIGS, VAE_CONFIGS
    from singlora_diffusion.single_file import original_state_dict

    with torch.device("meta"):
        components = {"unet": UNet2DConditionModel(**UNET_CONFIGS[arch]), "vae": AutoencoderKL(**VAE_CONFIGS[arch]),
                      "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L))}
        if arch == "sdxl":
            components["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG))
    shapes = {k: tuple(v.shape) for k, v in original_state_dict(components, "sdxl" if arch == "sdxl" else "sd").items()}
    # names and shapes as in v1-5-pruned.safetensors / sd_xl_base_1.0.safetensors
    expected = {
        "sd15": {"model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
                 "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
                 "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
                 "model.diffusion_model.middle_block.1.proj_in.weight": (1280, 1280, 1, 1),
                 "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
                 "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
                 "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
                 "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
                 "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc1.weight": (3072, 768)},
        "sdxl": {"model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
                 "model.diffusion_model.input_blocks.6.0.op.weight": (640, 640, 3, 3),
                 "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
                 "model.diffusion_model.output_blocks.5.2.conv.weight": (640, 640, 3, 3),
                 "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
                 "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,),
                 "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
                 "conditioner.embedders.1.model.text_projection": (1280, 1280),
                 "conditioner.embedders.1.model.positional_embedding": (77, 1280)},
    }[arch]
    assert {k: shapes.get(k) for k in expected} == expected
