"""The toy-world experiments (experiments/toy_world) end to end in their --quick form, and their parts."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch
from PIL import Image

from experiments.toy_world import shapes
from experiments.toy_world.__main__ import main


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy_world")
    assert main(["pretrain", "--quick", "--out", str(out)]) == 0
    return out


def test_pretrain_writes_a_loadable_sd_pipeline(world):
    from diffusers import StableDiffusionPipeline

    stats = json.loads((world / "pretrain.json").read_text())
    with Image.open(world / "toy_world_pretrain.png") as im:  # samples of the pretrained model
        assert im.size[1] > 300
    assert math.isfinite(stats["denoiser_loss_ema"]) and stats["denoiser_loss_ema"] < 1.5
    pipe = StableDiffusionPipeline.from_pretrained(world / "model")
    names = {n.rsplit(".", 1)[-1] for n, _ in pipe.unet.named_modules()}
    assert {"to_q", "to_k", "to_v"} <= names  # what the trainer's "attn" preset adapts
    assert pipe.vae.config.scaling_factor != 0.18215  # set from the trained VAE's latents


def test_sweep_and_ramp_quick(world):
    from experiments.toy_world.sweep import GRIDS, runs_of

    for command in ("sweep", "ramp"):
        assert main([command, "--quick", "--out", str(world)]) == 0
        data = json.loads((world / f"{command}.json").read_text())
        expected = {json.dumps(r, sort_keys=True) for r in runs_of(GRIDS[(command, True)])}
        got = {json.dumps({k: r[k] for k in ("adapter", "rank", "lr", "ramp_frac", "init", "seed")}, sort_keys=True)
               for r in data["runs"].values()}
        assert got == expected
        for run in data["runs"].values():
            assert not run["diverged"]
            assert all(math.isfinite(run[m]) for m in ("subject_loss", "class_loss", "feature_sim", "star_rate"))
        with Image.open(world / f"toy_world_{command}.png") as im:
            assert im.size[0] > 400
        assert (world / f"{command}.md").read_text().startswith(("Base model", "| init"))
    # A second call finds every run cached and trains nothing new.
    before = (world / "ramp.json").read_text()
    assert main(["ramp", "--quick", "--out", str(world)]) == 0
    assert json.loads((world / "ramp.json").read_text())["runs"] == json.loads(before)["runs"]


def test_parameter_counts_follow_the_layer_shapes(world):
    """SingLoRA: max(d_in, d_out)·r per layer; LoRA: (d_in + d_out)·r, counted from the base model's Linears."""
    from diffusers import UNet2DConditionModel

    data = json.loads((world / "sweep.json").read_text())
    unet = UNet2DConditionModel.from_pretrained(world / "model", subfolder="unet")
    layers = [m for n, m in unet.named_modules() if n.endswith(("to_q", "to_k", "to_v", "to_out.0"))]
    for run in data["runs"].values():
        per_layer = max if run["adapter"] == "singlora" else (lambda a, b: a + b)
        assert run["params"] == sum(per_layer(l.in_features, l.out_features) * run["rank"] for l in layers)


def test_fan_in_r_init_is_pytorch_default_scale():
    """The ablation's init has entries ~U(-1/sqrt(r), 1/sqrt(r)); ours ~U(-1/sqrt(n), 1/sqrt(n))."""
    from torch import nn

    from experiments.toy_world.sweep import reinit_fan_in_r
    from singlora_diffusion.layer import SingLoRALinear

    torch.manual_seed(0)
    model = nn.Sequential(SingLoRALinear(nn.Linear(256, 256), rank=4))
    ours = model[0].singlora_A.detach().clone()
    assert reinit_fan_in_r(model) == 1
    theirs = model[0].singlora_A.detach()
    assert ours.abs().max() <= 1 / math.sqrt(256)
    assert 0.9 / math.sqrt(4) < theirs.abs().max() <= 1 / math.sqrt(4)


def test_subject_never_in_pretraining_captions():
    rng = random.Random(0)
    captions = [shapes.class_sample(rng)[1] for _ in range(2000)]
    assert not any(shapes.SUBJECT["shape"] in c or "sks" in c for c in captions)
    assert {c.split()[2] for c in captions} == set(shapes.SHAPES)


def test_cached_runs_belong_to_the_pretrained_world(world, tmp_path):
    """Re-pretraining changes the fingerprint, so a sweep cannot reuse runs of an older model."""
    import shutil

    from experiments.toy_world.sweep import world_id

    data = json.loads((world / "sweep.json").read_text())
    assert data["world"] == world_id(world)
    copy = tmp_path / "copy"
    shutil.copytree(world / "model", copy / "model")
    state = torch.load(world / "extractor.pt", weights_only=True)
    torch.save(state, copy / "extractor.pt")
    assert world_id(copy) == world_id(world)
    next(iter(state.values())).add_(1e-3)
    torch.save(state, copy / "extractor.pt")
    assert world_id(copy) != world_id(world)
