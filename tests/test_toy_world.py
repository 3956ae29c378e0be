"""The toy-world experiments (experiments/toy_world) end to end in their --quick form, and their parts.

They run on a quick toy base pretrained here (what `python -m singlora_diffusion.toy pretrain
--quick --out DIR` writes), never on the shipped weights: nothing here depends on what a base draws.
"""
from __future__ import annotations

import json
import math
import random
import shutil

import pytest
import torch
from PIL import Image

from experiments.toy_world.__main__ import main
from singlora_diffusion.pipelines import TOY_BASE
from singlora_diffusion.toy import base, world


@pytest.fixture(scope="module")
def toy_base(tmp_path_factory):
    from singlora_diffusion.toy.pretrain import QUICK, pretrain

    folder = tmp_path_factory.mktemp("toy_base")
    pretrain(folder, QUICK, log=lambda *a: None)
    return folder


@pytest.fixture(scope="module")
def results(toy_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("toy_world")
    for command in ("sweep", "ramp"):
        assert main([command, "--quick", "--world", str(toy_base), "--out", str(out)]) == 0
    return out


def test_sweep_and_ramp_quick(toy_base, results):
    from experiments.toy_world.sweep import GRIDS, runs_of

    for command in ("sweep", "ramp"):
        data = json.loads((results / f"{command}.json").read_text())
        expected = {json.dumps(r, sort_keys=True) for r in runs_of(GRIDS[(command, True)])}
        got = {json.dumps({k: r[k] for k in ("adapter", "rank", "lr", "ramp_frac", "init", "seed")}, sort_keys=True)
               for r in data["runs"].values()}
        assert got == expected
        for run in data["runs"].values():
            assert not run["diverged"]
            assert all(math.isfinite(run[m]) for m in ("subject_loss", "class_loss", "feature_sim", "subject_rate"))
            assert ("loraplus_lr_ratio" in run) == (run["adapter"] == "loraplus")
        with Image.open(results / f"toy_world_{command}.png") as im:
            assert im.size[0] > 400
        assert (results / f"{command}.md").read_text().startswith(("Base model", "| init"))
    assert {r["adapter"] for r in json.loads((results / "sweep.json").read_text())["runs"].values()} == {
        "singlora", "lora", "loraplus"}
    # A second call finds every run cached and trains nothing new (a rerun would change "seconds").
    before = (results / "ramp.json").read_text()
    assert main(["ramp", "--quick", "--world", str(toy_base), "--out", str(results)]) == 0
    assert json.loads((results / "ramp.json").read_text())["runs"] == json.loads(before)["runs"]


def test_another_world_is_trained_from_a_diffusers_copy_of_it(toy_base, results):
    from diffusers import StableDiffusionPipeline

    from experiments.toy_world.sweep import world_id

    pipe = StableDiffusionPipeline.from_pretrained(results / "model")
    names = {n.rsplit(".", 1)[-1] for n, _ in pipe.unet.named_modules()}
    assert {"to_q", "to_k", "to_v"} <= names  # what the trainer's "attn" preset adapts
    assert pipe.vae.config.scaling_factor == base.read_record(toy_base)["scaling_factor"]
    original = base.load_pipeline(toy_base).unet.state_dict()
    assert all(torch.equal(v, original[k]) for k, v in pipe.unet.state_dict().items())
    assert (results / "model" / "toy_world.txt").read_text() == world_id(toy_base)


def test_runs_train_on_the_bundled_subject_and_its_captions(toy_base, results, tmp_path):
    from experiments.toy_world.sweep import GRIDS, open_world, runs_of, train_config
    from singlora_diffusion.training import validate

    grid = GRIDS[("sweep", False)]
    inputs = validate(train_config(open_world(toy_base, results), next(runs_of(grid)), grid, tmp_path))
    assert sorted(item.prompt for item in inputs.items) == sorted(
        world.subject_caption(bg) for bg in world.SUBJECT_BACKGROUNDS)  # "a sks shape on a red background", ...


def test_the_shipped_world_is_the_default():
    from experiments.toy_world.sweep import open_world, world_id

    toy = open_world(None, out=None)  # the shipped base needs no saved copy
    assert (toy.model, toy.folder, toy.id) == (TOY_BASE, base.world_folder(), world_id(base.world_folder()))
    assert open_world(base.world_folder(), out=None).model == TOY_BASE


def test_a_missing_world_names_the_command_that_makes_it(tmp_path):
    with pytest.raises(SystemExit, match="singlora_diffusion.toy pretrain"):
        main(["sweep", "--quick", "--world", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")])


def test_subject_rate_counts_the_subjects_shape_in_its_colour():
    from torch.nn import functional as F

    from singlora_diffusion.toy.models import called_subject

    shapes, colours = ["cross", "cross", "circle"], ["magenta", "red", "magenta"]
    logits = [F.one_hot(torch.tensor([names.index(n) for n in picked]), len(names)).float()
              for names, picked in ((world.ALL_SHAPES, shapes), (world.ALL_COLOURS, colours))]
    extractor = lambda images: logits + [torch.zeros(len(images), len(world.COLOURS))]  # noqa: E731
    assert called_subject(extractor, torch.zeros(3, 3, world.SIZE, world.SIZE)).tolist() == [True, False, False]


def test_parameter_counts_follow_the_layer_shapes(results):
    """SingLoRA: max(d_in, d_out)·r per layer; LoRA (and LoRA+): (d_in + d_out)·r, from the base model's Linears."""
    from diffusers import UNet2DConditionModel

    data = json.loads((results / "sweep.json").read_text())
    unet = UNet2DConditionModel.from_pretrained(results / "model", subfolder="unet")
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
    captions = [world.class_sample(rng)[1] for _ in range(2000)]
    assert not any(world.SUBJECT_SHAPE in c or "magenta" in c or world.IDENTIFIER in c for c in captions)
    assert {c.split()[2] for c in captions} == set(world.SHAPES)


def test_a_re_pretrained_world_reruns_everything(toy_base, results, tmp_path):
    """Changed weights change the fingerprint: cached runs and the saved model copy are not reused."""
    from safetensors.torch import load_file, save_file

    from experiments.toy_world.sweep import world_id

    changed = tmp_path / "changed"
    shutil.copytree(toy_base, changed)
    assert world_id(changed) == world_id(toy_base)
    weights = load_file(str(changed / base.PIPELINE_FILE))
    name = next(k for k in weights if k.startswith("unet.") and k.endswith("to_q.weight"))
    weights[name] += 0.01
    save_file(weights, str(changed / base.PIPELINE_FILE))
    record = base.read_record(changed)  # as a new pretraining would write it
    (changed / base.RECORD_FILE).write_text(json.dumps(dict(record, fingerprint=base.fingerprint(changed))))
    assert world_id(changed) != world_id(toy_base)

    out = tmp_path / "out"
    shutil.copytree(results, out)
    before = json.loads((out / "ramp.json").read_text())
    assert main(["ramp", "--quick", "--world", str(changed), "--out", str(out)]) == 0
    after = json.loads((out / "ramp.json").read_text())
    assert (before["world"], after["world"]) == (world_id(toy_base), world_id(changed))
    assert after["runs"].keys() == before["runs"].keys()
    assert all(after["runs"][k]["seconds"] != before["runs"][k]["seconds"] for k in before["runs"])
    saved = load_file(str(out / "model" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert torch.equal(saved[name[len("unet."):]], weights[name].float())
