"""`singlora inspect` / `import` on SD3/3.5 and Flux.1 files: native ones, their diffusers and kohya
exports, and SingLoRA files under `transformer.` PEFT keys (SimpleTuner / peft-singlora on a DiT)."""
import json

import pytest
import torch
from safetensors.torch import save_file

from singlora_diffusion.export import export_diffusers, export_kohya
from singlora_diffusion.format import read_adapter, save_adapter
from singlora_diffusion.layouts import describe, detect_layout, import_file

from .test_comfyui_dit import CLIP_LAYERS, adapted

ARCHS = ("sd3", "flux")


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    """arch -> a native file with every transformer Linear and the CLIP encoder layers adapted."""
    out = {}
    for arch in ARCHS:
        path = tmp_path_factory.mktemp(arch) / "singlora_weights.safetensors"
        out[arch] = save_adapter(path, adapted(arch), f"tiny:{arch}", [".*"], list(CLIP_LAYERS))
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_inspect_names_the_family_of_each_file_form(arch, native, tmp_path):
    export_diffusers(native[arch], tmp_path / "diffusers")
    files = {"native": native[arch], "diffusers-lora": tmp_path / "diffusers",
             "kohya-lora": export_kohya(native[arch], tmp_path / "k.safetensors")}
    for kind, path in files.items():
        layout = detect_layout(path)
        lines = describe(layout)
        assert layout.kind == kind
        assert lines["fits"].startswith(f"{arch} ("), (kind, lines["fits"])
        assert "transformer: " in lines["targets"], lines["targets"]
        assert "to_q" in lines["targets"] and "add_q_proj" in lines["targets"]


def test_full_size_widths_tell_sd3_from_flux(tmp_path):
    """A q,k-only file (no Flux-only block, no second CLIP) is told apart by its attention width."""
    for width, says in ((1536, "sd3 (attention 1536"), (2432, "sd3 (attention 2432"), (3072, "flux (attention 3072")):
        path = tmp_path / f"w{width}.safetensors"
        save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, width),
                   "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(width, 2)}, str(path))
        assert describe(detect_layout(path))["fits"].startswith(says)


def test_a_peft_singlora_flux_file_imports_with_its_matrices_unchanged(native, tmp_path):
    """SimpleTuner / peft-singlora on Flux: transformer.{path}.lora_A.weight, one (n, r) matrix per layer,
    r and α in lora_adapter_metadata; the update is ours, so A is copied as it is."""
    ours = read_adapter(native["flux"])
    transformer = {k: A for k, A in ours.tensors.items() if k.startswith("transformer.")}
    path = tmp_path / "peft.safetensors"
    save_file({f"{k}.lora_A.weight": A.contiguous() for k, A in transformer.items()}, str(path),
              metadata={"lora_adapter_metadata": json.dumps({"transformer.r": 2, "transformer.lora_alpha": 5.0})})
    layout = detect_layout(path)
    assert layout.kind == "singlora-peft" and describe(layout)["fits"].startswith("flux (")
    done = import_file(path, "tiny:flux", tmp_path / "mine.safetensors", step=3, ramp_up_steps=4)
    assert done.loaded == len(transformer) and not done.skipped
    got = read_adapter(done.out)
    assert got.metadata["base_arch"] == "flux" and (got.rank, got.alpha, got.step) == (2, 5.0, 3)
    assert got.tensors.keys() == transformer.keys()
    for k, A in transformer.items():
        torch.testing.assert_close(got.tensors[k], A, rtol=0, atol=0)
    assert got.shapes == {k: ours.shapes[k] for k in transformer}
    targets = json.loads(got.metadata["target_modules"])  # the transformer's kinds, not text-encoder ones
    assert {"to_q", "add_q_proj", "proj_mlp"} <= set(targets), targets
    assert got.metadata["text_encoder_target_modules"] == "null"


@pytest.mark.parametrize("arch", ARCHS)
def test_a_native_file_names_its_family_from_its_metadata(arch, tmp_path):
    """q and k only, no second encoder, tiny widths: only the metadata tells (the transformer keys alone do not)."""
    path = save_adapter(tmp_path / "a.safetensors", adapted(arch, text_targets=None), f"tiny:{arch}", ["to_q"], None)
    assert describe(detect_layout(path))["fits"] == f"{arch} (its metadata: trained on tiny:{arch})"
