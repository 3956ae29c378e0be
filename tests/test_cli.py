"""The `singlora` command end to end on a tiny pipeline: files, keys, numbers, errors."""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from singlora_diffusion.cli import main
from singlora_diffusion.format import read_adapter, save_adapter

from .helpers import adapted_pipeline


@pytest.fixture(scope="module")
def adapter_file(tiny_pipeline_dir, tmp_path_factory):
    base = tiny_pipeline_dir("sd15")
    _, components, cfg = adapted_pipeline(base)
    return base, save_adapter(tmp_path_factory.mktemp("cli") / "a.safetensors", components, str(base),
                              cfg.target_modules, cfg.text_encoder_target_modules)


def test_console_script_and_module_entry_point(tmp_path):
    out = subprocess.run([sys.executable, "-m", "singlora_diffusion", "tiny-pipeline", str(tmp_path / "p"),
                          "--arch", "sdxl"], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    index = json.loads((tmp_path / "p" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert (tmp_path / "p" / "tokenizer" / "tokenizer_config.json").is_file()


def test_tiny_pipeline_loads_back_exactly(tmp_path):
    from diffusers import DiffusionPipeline

    from singlora_diffusion.tiny import build_tiny_pipeline

    assert main(["tiny-pipeline", str(tmp_path / "p"), "--seed", "3"]) == 0
    loaded = DiffusionPipeline.from_pretrained(str(tmp_path / "p"))
    fresh = build_tiny_pipeline("sd15", seed=3)
    for a, b in zip(loaded.unet.state_dict().values(), fresh.unet.state_dict().values()):
        assert torch.equal(a, b)
    assert loaded.tokenizer("a photo of sks dog").input_ids == [49406, 320, 1125, 539, 48136, 1929, 49407]


def test_inspect(adapter_file, capsys):
    _, path = adapter_file
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    adapter = read_adapter(path)
    unet = {k: v for k, v in adapter.tensors.items() if k.startswith("unet.")}
    assert f"unet: {len(unet)} modules, {sum(v.numel() for v in unet.values()):,} parameters" in out
    assert "format: singlora" in out and "step: 7" in out


def test_export_merge_and_generate(adapter_file, tmp_path):
    base, path = adapter_file
    assert main(["export", str(path), "--to", "diffusers", str(tmp_path / "d")]) == 0
    assert main(["export", str(path), "--to", "kohya", str(tmp_path / "k.safetensors")]) == 0
    assert main(["merge", "--base", str(base), "--adapter", str(path), "--out", str(tmp_path / "m")]) == 0
    common = ["--prompt", "a photo of sks dog", "--steps", "3", "--seed", "1"]
    images = {}
    for name, extra in {"native": ["--base", str(base), "--adapter", str(path)],
                        "diffusers": ["--base", str(base), "--adapter", str(tmp_path / "d")],
                        "kohya": ["--base", str(base), "--adapter", str(tmp_path / "k.safetensors")],
                        "merged": ["--base", str(tmp_path / "m")],
                        "plain": ["--base", str(base)]}.items():
        out = tmp_path / f"{name}.png"
        assert main(["generate", *extra, *common, "--out", str(out)]) == 0
        images[name] = torch.tensor(list(Image.open(out).getdata()), dtype=torch.float32)
    assert json.loads(Image.open(tmp_path / "native.png").text["parameters"])["seed"] == 1
    for name in ("diffusers", "kohya", "merged"):
        assert (images[name] - images["native"]).abs().max() <= 1  # 8-bit rounding only
    assert (images["plain"] - images["native"]).abs().mean() > 1


def test_merge_saved_in_fp16_generates(adapter_file, tmp_path):
    """An fp16 folder (hub fp16 variants, --save_precision fp16) must not load fp16 text encoders beside an fp32 UNet."""
    base, path = adapter_file
    merged = tmp_path / "m16"
    assert main(["merge", "--base", str(base), "--adapter", str(path), "--out", str(merged), "--save_precision",
                 "fp16"]) == 0
    from safetensors import safe_open

    with safe_open(str(next((merged / "unet").glob("*.safetensors"))), framework="pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16
    assert main(["generate", "--base", str(merged), "--prompt", "a photo of sks dog", "--steps", "2", "--out",
                 str(tmp_path / "x.png")]) == 0


def test_errors_are_one_line_without_traceback(tmp_path, capsys):
    assert main(["generate", "--base", str(tmp_path / "nope"), "--prompt", "x", "--out", "x.png"]) == 2
    assert "nope: no such folder" in capsys.readouterr().err
    assert main(["generate", "--base", "someone/not-cached-model", "--prompt", "x", "--out", "x.png"]) == 2
    err = capsys.readouterr().err
    assert "not in the Hugging Face cache" in err and "HF_HUB_OFFLINE=1" in err and "Traceback" not in err
    assert main(["inspect", str(tmp_path / "missing.safetensors")]) == 2
    assert "no adapter at" in capsys.readouterr().err  # inspect reads LoRA files too
    (tmp_path / "empty").mkdir()
    assert main(["merge", "--base", str(tmp_path / "empty"), "--adapter", "x", "--out", "y"]) == 2
    assert "no SingLoRA adapter at x" in capsys.readouterr().err


def test_a_crash_that_is_not_a_user_error_keeps_its_traceback(monkeypatch, tmp_path):
    """CUDA out of memory (a RuntimeError) or a bug must not be turned into a one-line "error"."""
    import singlora_diffusion.layouts as layouts

    def out_of_memory(*_a, **_k):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
    monkeypatch.setattr(layouts, "detect_layout", out_of_memory)
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        main(["inspect", str(tmp_path / "a.safetensors")])
