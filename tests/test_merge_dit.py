"""`singlora merge` on SD3/3.5 and Flux.1: the merged folder loads in diffusers with the injected
model's outputs; --single_file (SD1.x / SDXL layouts only) is refused before the base loads."""
import pytest
import torch

from singlora_diffusion.errors import BadInput
from singlora_diffusion.export import merge_into_pipeline, merge_to_single_file
from singlora_diffusion.format import save_adapter

from .test_comfyui_dit import CLIP_LAYERS, adapted


def latents(pipe):
    return pipe("a photo of sks dog", num_inference_steps=2, height=32, width=32, max_sequence_length=16,
                generator=torch.Generator().manual_seed(0), output_type="latent").images


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_the_merged_folder_loads_in_diffusers_with_the_injected_outputs(arch, tmp_path):
    from diffusers import DiffusionPipeline

    from singlora_diffusion.pipelines import load_pipeline

    components = adapted(arch)
    path = save_adapter(tmp_path / "a.safetensors", components, f"tiny:{arch}", [".*"], list(CLIP_LAYERS))
    before = latents(load_pipeline(f"tiny:{arch}"))
    injected = load_pipeline(f"tiny:{arch}")
    from singlora_diffusion.format import load_adapter
    from singlora_diffusion.pipelines import pipeline_components

    load_adapter(pipeline_components(injected), path)
    want = latents(injected)
    out = merge_into_pipeline(f"tiny:{arch}", path, tmp_path / "merged", log=lambda line: None)
    merged = DiffusionPipeline.from_pretrained(str(out))
    assert type(merged).__name__ == {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}[arch]
    assert (want - before).abs().max() > 1e-3  # the adapter changes the image
    torch.testing.assert_close(latents(merged), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_single_file_is_refused_before_the_base_loads(arch, tmp_path, monkeypatch):
    import singlora_diffusion.pipelines as pipelines

    path = save_adapter(tmp_path / "a.safetensors", adapted(arch, text_targets=None), f"tiny:{arch}", ["to_q"], None)
    monkeypatch.setattr(pipelines, "load_pipeline", lambda *a, **k: pytest.fail("the base was loaded"))
    with pytest.raises(BadInput, match=f"is an {arch} adapter: merge into a folder with --out MERGED_DIR"):
        merge_to_single_file("tiny:" + arch, path, tmp_path / "one.safetensors")
    assert not (tmp_path / "one.safetensors").exists()
