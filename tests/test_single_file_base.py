"""Single-file checkpoints (A1111 / Civitai .safetensors) as bases: loaded offline through diffusers'
from_single_file, the architecture read from the file's header, and everything else refused in one
line naming the file before any model loads.

Files written by `singlora merge --single_file` from the tiny pipelines load at their own shapes (the
configs they record); a file without them (a real A1111 file) goes through the reference configs,
tested at real size on random:sd15 and, for every architecture, on header-only files whose keys and
shapes are those of the real checkpoints.
"""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from singlora_diffusion.cli import main
from singlora_diffusion.errors import BadInput, NotFound
from singlora_diffusion.format import read_adapter, save_adapter
from singlora_diffusion.pipelines import check_base_exists, load_pipeline, resolve_base
from singlora_diffusion.reference_configs import pipeline_configs
from singlora_diffusion.single_file import CONFIGS_KEY, read_checkpoint, write_config_folder

from .helpers import adapted_pipeline
from .train_helpers import tiny_config

USER_CACHE = os.environ.get("SINGLORA_CACHE")  # where random:sd15 is built once, for every test file
COMPONENTS = {"sd15": ("unet", "vae", "text_encoder"), "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2")}


@pytest.fixture(autouse=True)
def own_cache(tmp_path_factory, monkeypatch):
    """Config folders are built in a cache of this module's own, so a test sees them built by this code."""
    monkeypatch.setenv("SINGLORA_CACHE", str(tmp_path_factory.getbasetemp() / "singlora_cache"))


@pytest.fixture(scope="module")
def checkpoint(tiny_pipeline_dir, tmp_path_factory):
    """checkpoint("sd15") -> (tiny base folder, the file `singlora merge --single_file` writes from it at
    --scale 0 in fp32: the base's own weights, in the original layout)."""
    cache = {}

    def get(arch):
        if arch not in cache:
            base = tiny_pipeline_dir(arch)
            _, components, cfg = adapted_pipeline(base)
            root = tmp_path_factory.mktemp(f"single_{arch}")
            adapter = save_adapter(root / "a.safetensors", components, str(base), cfg.target_modules,
                                   cfg.text_encoder_target_modules)
            out = root / f"tiny-{arch}.safetensors"
            assert main(["merge", "--base", str(base), "--adapter", str(adapter), "--single_file", str(out),
                         "--dtype", "fp32", "--scale", "0"]) == 0
            cache[arch] = base, out
        return cache[arch]
    return get


def assert_same_pipeline(loaded, reference, arch):
    assert type(loaded) is type(reference)
    for name in COMPONENTS[arch]:
        got, want = getattr(loaded, name).state_dict(), getattr(reference, name).state_dict()
        assert set(got) == set(want), name
        for key, value in want.items():
            assert got[key].dtype == value.dtype and torch.equal(got[key], value), f"{name}.{key}"
    public = lambda config: {k: v for k, v in dict(config).items() if not k.startswith("_")}  # noqa: E731
    for name in ("unet", "vae", "scheduler"):  # a wrong scaling_factor or prediction_type loads fine, and trains wrong
        assert public(getattr(loaded, name).config) == public(getattr(reference, name).config), name
    for name in COMPONENTS[arch][2:]:
        text = [{k: v for k, v in getattr(p, name).config.to_dict().items()
                 if k not in ("dtype", "transformers_version")} for p in (loaded, reference)]
        assert public(text[0]) == public(text[1]), name
    for name in ("tokenizer", "tokenizer_2")[:len(COMPONENTS[arch]) - 2]:
        ids = [getattr(p, name)("a photo of sks dog", padding="max_length").input_ids for p in (loaded, reference)]
        assert ids[0] == ids[1] and len(ids[0]) == 77, name


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_merged_single_file_loads_as_the_folder_and_trains(arch, checkpoint, tmp_path):
    from diffusers import DiffusionPipeline

    from singlora_diffusion.training import train

    base, path = checkpoint(arch)
    found = read_checkpoint(path)
    assert (found.arch, found.recorded) == (arch, True)
    assert_same_pipeline(load_pipeline(path), DiffusionPipeline.from_pretrained(str(base)), arch)

    out = tmp_path / "run"
    files = train(tiny_config(path, out, max_train_steps=2))
    adapter = read_adapter(files["adapter"])
    assert adapter.step == 2 and adapter.metadata["base_model"] == str(path)  # how eval and generate find it again
    assert f"base_model: {path}" in (out / "README.md").read_text()


def test_fp16_load_keeps_the_vae_in_float32(checkpoint):
    _, path = checkpoint("sd15")
    pipe = load_pipeline(path, dtype=torch.float16, vae_fp32_if_upcast=True)
    assert (pipe.unet.dtype, pipe.text_encoder.dtype, pipe.vae.dtype) == (torch.float16, torch.float16, torch.float32)
    assert load_pipeline(path, dtype=torch.float16).vae.dtype == torch.float16


def test_a_file_without_recorded_configs_uses_the_reference_ones(checkpoint, tmp_path):
    """A tiny file stripped of its configs is read as an A1111 SD1.x file: the real-size configs,
    which its tiny weights do not fit, refused in one line naming it."""
    _, path = checkpoint("sd15")
    stripped = tmp_path / "a1111.safetensors"
    save_file(load_file(str(path)), str(stripped), metadata={"format": "pt"})
    found = read_checkpoint(stripped)
    assert (found.arch, found.recorded) == ("sd15", False)
    assert found.configs == pipeline_configs("sd15")
    with pytest.raises(BadInput, match=rf"^{stripped}: its weights do not fit the SD1.x, reference configs"):
        load_pipeline(stripped)


@pytest.mark.realsize
def test_real_size_sd15_file_loads_through_the_reference_configs(tmp_path):
    """random:sd15 (the real SD1.5 configs) written as A1111 writes it: no recorded configs."""
    from diffusers import DiffusionPipeline

    from singlora_diffusion.single_file import original_state_dict

    with pytest.MonkeyPatch.context() as m:  # the shared random:sd15 (2 GB), not one built for this module
        m.delenv("SINGLORA_CACHE") if USER_CACHE is None else m.setenv("SINGLORA_CACHE", USER_CACHE)
        folder = resolve_base("random:sd15")
    reference = DiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float16)
    path = tmp_path / "v1-5-random.safetensors"
    save_file(original_state_dict({c: getattr(reference, c) for c in COMPONENTS["sd15"]}, "sd"), str(path))
    assert (read_checkpoint(path).arch, read_checkpoint(path).recorded) == ("sd15", False)
    assert_same_pipeline(load_pipeline(path, dtype=torch.float16), reference, "sd15")


# ---------------------------------------------------------------------------------------------
# detection on header-only files: the real checkpoints' keys and shapes, 1-element tensors

def original_config_v2():
    """The UNet part of Stability-AI/stablediffusion configs/stable-diffusion/v2-inference-v.yaml."""
    unet = dict(in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1], num_res_blocks=2,
                channel_mult=[1, 2, 4, 4], num_head_channels=64, use_linear_in_transformer=True, transformer_depth=1,
                context_dim=1024)
    return {"model": {"params": {"unet_config": {"params": unet},
                                 "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}


def open_clip_keys(prefix: str, width: int, layers: int) -> dict[str, tuple]:
    """OpenCLIP's text tower as the original checkpoints store it (open_clip's TextTransformer)."""
    shapes = {"token_embedding.weight": (49408, width), "positional_embedding": (77, width),
              "ln_final.weight": (width,), "ln_final.bias": (width,), "text_projection": (width, width)}
    for i in range(layers):
        block = {"attn.in_proj_weight": (3 * width, width), "attn.in_proj_bias": (3 * width,),
                 "attn.out_proj.weight": (width, width), "attn.out_proj.bias": (width,),
                 "mlp.c_fc.weight": (4 * width, width), "mlp.c_fc.bias": (4 * width,),
                 "mlp.c_proj.weight": (width, 4 * width), "mlp.c_proj.bias": (width,),
                 **{f"{n}.{p}": (width,) for n in ("ln_1", "ln_2") for p in ("weight", "bias")}}
        shapes.update({f"transformer.resblocks.{i}.{k}": v for k, v in block.items()})
    return {prefix + k: v for k, v in shapes.items()}


def real_keys(arch: str) -> dict[str, tuple]:
    """key -> shape of a real checkpoint: UNet and VAE (and SD1.x / SDXL's CLIP) through the writer's
    layout (checked against the real files in test_merge), SD2.x's OpenCLIP-H from open_clip's."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from singlora_diffusion.reference_configs import CLIP_BIGG, CLIP_L, UNET_CONFIGS, VAE_CONFIGS
    from singlora_diffusion.single_file import original_state_dict

    with torch.device("meta"):
        components = {"unet": UNet2DConditionModel(**UNET_CONFIGS[arch]), "vae": AutoencoderKL(**VAE_CONFIGS[arch]),
                      "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L))}
        if arch == "sdxl":
            components["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG))
    keys = {k: tuple(v.shape) for k, v in original_state_dict(components, "sdxl" if arch == "sdxl" else "sd").items()}
    if arch.startswith("sd2"):
        keys = {k: v for k, v in keys.items() if not k.startswith("cond_stage_model.transformer.")}
        keys.update(open_clip_keys("cond_stage_model.model.", 1024, 24))
    return keys


def header_file(path, keys: dict[str, tuple], **extra: torch.Tensor):
    """A .safetensors file with these keys; only the shapes detection reads are real (the rest 1 element)."""
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES

    read = {CHECKPOINT_KEY_NAMES["v2"], CHECKPOINT_KEY_NAMES["inpainting"]}
    save_file({**{k: torch.zeros(v if k in read else (1,), dtype=torch.float16) for k, v in keys.items()}, **extra},
              str(path))
    return path


@pytest.mark.parametrize("arch, prediction", [("sd15", "epsilon"), ("sd21", "v_prediction"), ("sdxl", "epsilon")])
def test_architecture_read_from_the_header(arch, prediction, tmp_path):
    found = read_checkpoint(header_file(tmp_path / "model.safetensors", real_keys(arch)))
    assert (found.arch, found.recorded) == (arch, False)
    assert found.configs["scheduler"].get("prediction_type", "epsilon") == prediction  # the schedulers' default
    check_base_exists(tmp_path / "model.safetensors")


def test_sd2_base_is_epsilon_at_512_by_its_global_step(tmp_path):
    """diffusers' rule: an SD2 checkpoint saved at step 875000 is SD2.0-base (epsilon, 512 px)."""
    keys = real_keys("sd21")
    for step, arch, prediction, size in [(875000, "sd2-base", "epsilon", 64), (110000, "sd21", "v_prediction", 96)]:
        found = read_checkpoint(header_file(tmp_path / f"{step}.safetensors", keys, global_step=torch.tensor(step)))
        assert (found.arch, found.configs["scheduler"]["prediction_type"]) == (arch, prediction)
        assert found.configs["unet"]["sample_size"] == size


def test_sd2_configs_match_the_original_checkpoint_and_config():
    """SD2.x's reference configs against independent sources: diffusers' own LDM-config converter on
    the original v2-inference-v.yaml, and OpenCLIP-H's real shapes through diffusers' text converter."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint, create_unet_diffusers_config_from_ldm
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = pipeline_configs("sd21")
    header = {"model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": torch.empty(320, 1024)}
    expected = create_unet_diffusers_config_from_ldm(original_config_v2(), header)
    assert {k: configs["unet"].get(k, 1 if k == "transformer_layers_per_block" else None) for k in expected} == \
        {k: tuple(v) if isinstance(v, list) else v for k, v in expected.items()}
    with torch.device("meta"):
        text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"]))
        original = {k: torch.empty(v) for k, v in open_clip_keys("cond_stage_model.model.", 1024, 24).items()}
        converted = convert_open_clip_checkpoint(text_encoder, original)
    want = {k: tuple(v.shape) for k, v in text_encoder.state_dict().items() if "position_ids" not in k}
    assert {k.removeprefix("text_model."): tuple(v.shape) for k, v in converted.items()} == want


def test_config_folder_has_what_from_single_file_reads(tmp_path):
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTokenizer

    from singlora_diffusion.tiny import clip_tokenizer

    folder = write_config_folder(tmp_path / "sd21", pipeline_configs("sd21"))
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["safety_checker"] == [None, None]
    assert DDIMScheduler.from_pretrained(str(folder), subfolder="scheduler").config.prediction_type == "v_prediction"
    assert UNet2DConditionModel.load_config(str(folder), subfolder="unet")["cross_attention_dim"] == 1024
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), subfolder="tokenizer")
    ids = tokenizer("a photo", padding="max_length").input_ids
    assert ids[:4] == clip_tokenizer()("a photo").input_ids and ids[4:] == [0] * 73  # OpenCLIP pads with "!" (id 0)


# ---------------------------------------------------------------------------------------------
# refusals: one line naming the file, before any model loads

def bad_bases(checkpoint, tiny_pipeline_dir, root):
    """name -> (path, fragment of the one line that refuses it, error type)."""
    from singlora_diffusion.export import export_kohya

    base, good = checkpoint("sd15")
    tensors = load_file(str(good))
    _, components, cfg = adapted_pipeline(tiny_pipeline_dir("sd15"))
    adapter = save_adapter(root / "adapter.safetensors", components, "tiny:sd15", cfg.target_modules)
    (root / "notes.safetensors").write_text("my notes")
    (root / "truncated.safetensors").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (root / "model.ckpt").write_bytes(b"\x80\x02}q\x00.")  # a pickle: never opened
    save_file({k: v for k, v in tensors.items() if not k.startswith("first_stage_model.")},
              str(root / "no_vae.safetensors"), metadata={"format": "pt"})
    save_file(tensors, str(root / "bad_meta.safetensors"), metadata={CONFIGS_KEY: "{not json"})
    # the refiner: SDXL's OpenCLIP-bigG alone, as the first embedder
    refiner = {k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v
               for k, v in real_keys("sdxl").items() if not k.startswith("conditioner.embedders.0.")}
    inpainting = {**real_keys("sd15"), "model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)}
    return {
        "missing": (root / "missing.safetensors", "no such file", NotFound),
        "notes": (root / "notes.safetensors", "is not a readable .safetensors checkpoint", BadInput),
        "truncated": (root / "truncated.safetensors", "is not a readable .safetensors checkpoint", BadInput),
        "ckpt": (root / "model.ckpt", "a pickled checkpoint (.ckpt) is not loaded", BadInput),
        "singlora": (adapter, "is a SingLoRA adapter file, not a base checkpoint", BadInput),
        "kohya": (export_kohya(adapter, root / "kohya.safetensors"), "is a LoRA file, not a base checkpoint", BadInput),
        "unet_only": (next((base / "unet").glob("*.safetensors")), "one diffusers component's weights", BadInput),
        "no_vae": (root / "no_vae.safetensors", "without its VAE (first_stage_model.* weights)", BadInput),
        "bad_meta": (root / "bad_meta.safetensors", f"its {CONFIGS_KEY} metadata is not the JSON", BadInput),
        "refiner": (header_file(root / "refiner.safetensors", refiner), "is an SDXL refiner", BadInput),
        "inpainting": (header_file(root / "inpaint.safetensors", inpainting), "is an SD1.x inpainting model", BadInput),
    }


@pytest.fixture(scope="module")
def bad(checkpoint, tiny_pipeline_dir, tmp_path_factory):
    return bad_bases(checkpoint, tiny_pipeline_dir, tmp_path_factory.mktemp("bad_bases"))


@pytest.mark.parametrize("name", ["missing", "notes", "truncated", "ckpt", "singlora", "kohya", "unet_only", "no_vae",
                                  "bad_meta", "refiner", "inpainting"])
def test_not_a_base_checkpoint_is_refused_in_one_line(name, bad, monkeypatch, tmp_path, capsys):
    import diffusers

    path, fragment, error = bad[name]
    for cls in ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "AutoencoderKL"):
        monkeypatch.setattr(getattr(diffusers, cls), "from_single_file", lambda *a, **k: pytest.fail("a model loaded"))
    with pytest.raises(error) as e:
        check_base_exists(path)
    assert str(e.value).startswith((f"{path}", f"base model {path}")) and fragment in str(e.value)
    with pytest.raises(error):
        load_pipeline(path)
    argv = ["generate", "--base", str(path), "--prompt", "x", "--steps", "1", "--out", str(tmp_path / "g.png")]
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("singlora")]
    assert len(err) == 1 and fragment in err[0] and str(path) in err[0], err
