"""The trainer's optimizers (AdamW, Prodigy), --text_encoder_lr, LoRA+ and the EMA of the adapter weights."""
import importlib
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from singlora_diffusion.errors import BadInput, MissingDependency
from singlora_diffusion.format import read_adapter
from singlora_diffusion.training import build, loop, main, make_accelerator, train, validate
from singlora_diffusion.training.checkpoint import CheckpointError, SettingsMismatch, check_checkpoint

from .train_helpers import logged_scalars, tiny_config


def A_of(folder) -> dict:
    return load_file(str(Path(folder) / "singlora_weights.safetensors"))


def initial_A(base, folder) -> dict:
    """A as injected, before any step, keyed as in the files (the UNet's keys are its parameter names)."""
    trainee, _, _ = built(tiny_config(base, folder))
    params = trainee.named_parameters()
    assert [id(p) for p in params.values()] == [id(p) for p in trainee.parameters()]  # the EMA's order
    return {k: p.detach().clone() for k, p in params.items()}


def built(cfg):
    inputs = validate(cfg)
    accelerator = make_accelerator(cfg)
    return build(cfg, inputs, accelerator.device), inputs, accelerator


# -- param groups: --text_encoder_lr and LoRA+ -----------------------------------------------

@pytest.mark.parametrize("adapter", ["singlora", "lora", "loraplus"])
def test_each_adapter_tensor_trains_at_its_learning_rate(adapter, tiny_pipeline_dir, tmp_path):
    """UNet at --learning_rate, text encoder at --text_encoder_lr; LoRA+: B at ratio x its component's rate."""
    lr, te_lr, ratio, decay = 1e-3, 3e-4, 8.0, 0.05
    cfg = tiny_config(tiny_pipeline_dir(), tmp_path, adapter=adapter, learning_rate=lr, text_encoder_lr=te_lr,
                      train_text_encoder=True, loraplus_lr_ratio=ratio, adam_weight_decay=decay)
    trainee, inputs, accelerator = built(cfg)
    groups = loop.TrainingLoop(cfg, trainee, inputs, accelerator).optimizer.optimizer.param_groups
    names = {id(p): n for n, p in trainee.named_parameters().items()}
    seen = [names[id(p)] for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(names.values())  # every adapter tensor in exactly one group
    kinds = set()
    for g in groups:
        for p in g["params"]:
            name = names[id(p)]
            expected = te_lr if name.startswith("text_encoder.") else lr
            if adapter == "loraplus" and ".lora_B." in name:
                expected *= ratio
            kinds.add((name.split(".")[0], ".lora_B." in name))
            assert g["lr"] == pytest.approx(expected, rel=1e-12), name
            assert g["weight_decay"] == decay, name  # LoRA+ differs from LoRA in B's rate only
    assert {c for c, _ in kinds} == {"unet", "text_encoder"}
    if adapter != "singlora":
        assert {b for _, b in kinds} == {True, False}  # both A and B were looked at


# -- Prodigy -----------------------------------------------------------------------------------

def test_prodigy_trains_with_its_flags_and_the_ramp_counts_optimizer_steps(tiny_pipeline_dir, tmp_path, monkeypatch):
    pytest.importorskip("prodigyopt")
    from prodigyopt import Prodigy

    made = []
    real = loop.make_optimizer
    monkeypatch.setattr(loop, "make_optimizer", lambda *a: made.append(real(*a)) or made[-1])
    base = tiny_pipeline_dir()
    cfg = tiny_config(base, tmp_path / "run", optimizer="prodigy", learning_rate=None, prodigy_d_coef=50.0,
                      prodigy_safeguard_warmup=True, prodigy_use_bias_correction=True, max_train_steps=4,
                      gradient_accumulation_steps=2, ramp_up_steps=3, report_to="tensorboard")
    assert cfg.learning_rate == 1.0  # Prodigy's default: a multiplier of the step size it estimates
    before = initial_A(base, tmp_path / "init")
    train(cfg)
    (optimizer,) = made
    assert type(optimizer) is Prodigy
    (group,) = optimizer.param_groups
    assert (group["d_coef"], group["safeguard_warmup"], group["use_bias_correction"], group["lr"]) == (50.0, True,
                                                                                                         True, 1.0)
    # Prodigy counts the steps it updated: not step 1, whose gradient is 0 (u(0) = 0 scales A's gradient);
    # the ramp still counted it (u below). d, the step size it estimates, grew from d0 = 1e-6: in so few
    # steps only because d_coef 50 scales the estimate (at 1 it stays d0)
    assert group["k"] == 3 and group["d"] > 2 * group["d0"]
    after = A_of(tmp_path / "run")
    # Prodigy moved the weights, by about d per step (Adam-normalised steps of size d·lr)
    assert max((after[k] - v).abs().max().item() for k, v in before.items()) > 1e-6
    assert read_adapter(tmp_path / "run" / "singlora_weights.safetensors").step == 4  # not the 8 micro-batches
    u = [e.value for e in logged_scalars(tmp_path / "run")["u"]]
    assert u == pytest.approx([min(t / 3, 1.0) for t in range(1, 5)], abs=1e-6)


# -- EMA ---------------------------------------------------------------------------------------

def replayed_ema(live: list[dict], decay: float) -> dict:
    """diffusers' EMAModel in float64: the n-th update uses min(decay, n / (9 + n)), 0 at n = 1."""
    ema = {}
    for n, weights in enumerate(live, start=1):
        d = 0.0 if n == 1 else min(decay, (1 + (n - 1)) / (10 + (n - 1)))
        ema = {k: d * ema[k] + (1 - d) * w.double() if ema else w.double() for k, w in weights.items()}
    return ema


def test_ema_weights_are_the_average_of_the_live_ones_and_go_to_validation_and_files(tiny_pipeline_dir, tmp_path,
                                                                                    monkeypatch):
    decay, steps = 0.2, 4  # 0.2: steps 2 (2/11) and 3, 4 (capped at 0.2) take both branches of the formula
    seen = {}
    real = loop.validate_images

    def spy(cfg, trainee, accelerator, step, prompts):
        seen[step] = {k: p.detach().double().clone() for k, p in trainee.named_parameters().items()}
        return real(cfg, trainee, accelerator, step, prompts)
    monkeypatch.setattr(loop, "validate_images", spy)
    common = dict(max_train_steps=steps, checkpointing_steps=1, learning_rate=3e-2, ramp_up_steps=2)
    out = tmp_path / "ema"
    train(tiny_config(tiny_pipeline_dir(), out, use_ema=True, ema_decay=decay, validation_prompt="a photo of sks dog",
                      validation_steps=2, **common))
    live = [A_of(out / f"checkpoint-{n}") for n in range(1, steps + 1)]  # checkpoints hold the live weights
    order = list(initial_A(tiny_pipeline_dir(), tmp_path / "init"))
    final = A_of(out)
    for key, value in replayed_ema(live, decay).items():
        torch.testing.assert_close(final[key].double(), value, rtol=0, atol=1e-6)
    assert max((final[k] - live[-1][k]).abs().max().item() for k in final) > 1e-4  # the average, not the last
    for n in range(1, steps + 1):  # each checkpoint's EMA is the average so far
        state = torch.load(out / f"checkpoint-{n}" / "ema.pt", weights_only=True)
        assert state["optimization_step"] == n
        expected = replayed_ema(live[:n], decay)
        assert len(state["shadow_params"]) == len(order)  # in the adapter's parameter order
        for key, shadow in zip(order, state["shadow_params"]):
            torch.testing.assert_close(shadow.double(), expected[key], rtol=0, atol=1e-6)
    for n in (2, 4):  # validation rendered with the EMA weights
        expected = replayed_ema(live[:n], decay)
        assert seen[n].keys() == expected.keys()
        for key, value in seen[n].items():
            torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-6)
    # the EMA never reaches training: the live weights are those of a run without it
    plain = tmp_path / "plain"
    train(tiny_config(tiny_pipeline_dir(), plain, **common))
    assert all(torch.equal(A_of(plain / "checkpoint-4")[k], v) for k, v in live[-1].items())
    assert "EMA of the weights (decay 0.2)" in (out / "README.md").read_text()


@pytest.mark.parametrize("adapter", ["singlora", "loraplus"])
def test_resume_with_ema_equals_an_uninterrupted_run(adapter, tiny_pipeline_dir, tmp_path):
    common = dict(adapter=adapter, use_ema=True, ema_decay=0.5, max_train_steps=4, checkpointing_steps=2,
                  gradient_accumulation_steps=2, ramp_up_steps=3, learning_rate=1e-2)
    straight = tmp_path / "straight"
    train(tiny_config(tiny_pipeline_dir(), straight, **common))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    train(tiny_config(tiny_pipeline_dir(), resumed, resume_from_checkpoint="latest", **common))
    for name in ("pytorch_lora_weights.safetensors", "checkpoint-4/" + ("singlora_weights.safetensors"
                                                                       if adapter == "singlora"
                                                                       else "adapter_model.safetensors")):
        a, b = load_file(str(straight / name)), load_file(str(resumed / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name  # bit-identical
    ema_a, ema_b = (torch.load(d / "checkpoint-4" / "ema.pt", weights_only=True) for d in (straight, resumed))
    assert ema_a["optimization_step"] == ema_b["optimization_step"] == 4
    assert all(torch.equal(x, y) for x, y in zip(ema_a["shadow_params"], ema_b["shadow_params"]))
    two = torch.load(straight / "checkpoint-2" / "ema.pt", weights_only=True)["shadow_params"]
    assert max((x - y).abs().max().item() for x, y in zip(two, ema_b["shadow_params"])) > 1e-5  # it trained on


def test_check_checkpoint_reads_the_ema_file(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(tiny_pipeline_dir(), out, use_ema=True, max_train_steps=2, checkpointing_steps=1))
    cfg = tiny_config(tiny_pipeline_dir(), out, use_ema=True)
    assert check_checkpoint(out / "checkpoint-2", cfg)["step"] == 2
    shutil.copy(out / "checkpoint-1" / "ema.pt", out / "checkpoint-2" / "ema.pt")
    with pytest.raises(CheckpointError, match="ema.pt holds 1 EMA updates but trainer_state.json says step 2"):
        check_checkpoint(out / "checkpoint-2", cfg)
    (out / "checkpoint-2" / "ema.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="checkpoint-2/ema.pt is damaged"):
        check_checkpoint(out / "checkpoint-2", cfg)
    (out / "checkpoint-2" / "ema.pt").unlink()
    with pytest.raises(SettingsMismatch, match="written without --use_ema"):
        check_checkpoint(out / "checkpoint-2", cfg)
    check_checkpoint(out / "checkpoint-2", tiny_config(tiny_pipeline_dir(), out))  # without --use_ema: fine


# -- LoRA+ end to end ----------------------------------------------------------------------------

def test_loraplus_writes_what_lora_writes(tiny_pipeline_dir, tmp_path):
    from safetensors import safe_open

    from singlora_diffusion.adapters import check_adapter_file
    from singlora_diffusion.format import find_adapter_file
    from singlora_diffusion.pipelines import load_pipeline

    out = tmp_path / "loraplus"
    train(tiny_config(tiny_pipeline_dir(), out, adapter="loraplus", loraplus_lr_ratio=8, max_train_steps=2))
    assert (out / "checkpoint-2" / "adapter_model.safetensors").is_file()
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["lora_adapter_metadata"])["unet.use_dora"] is False
    assert find_adapter_file(out).name == "pytorch_lora_weights.safetensors"  # what evaluation and the web UI read
    assert check_adapter_file(out / "pytorch_lora_weights.safetensors") == "lora"
    assert "LoRA+: B's learning rate 8 x A's" in (out / "README.md").read_text()
    pipe = load_pipeline(tiny_pipeline_dir())
    pipe.load_lora_weights(str(out))


# -- bad input, before any model loads -----------------------------------------------------------

def _argv(base, out, *extra):
    return ["--pretrained_model_name_or_path", str(base), "--instance_data_dir", "bundled:dog3",
            "--instance_prompt", "a photo of sks dog", "--output_dir", str(out), *extra]


def _no_models(monkeypatch):
    def refuse(*_, **__):
        raise AssertionError("a model loaded before the flags were checked")
    monkeypatch.setattr(importlib.import_module("singlora_diffusion.training.build"), "load_pipeline", refuse)


@pytest.mark.parametrize("package,flags,message", [
    ("prodigyopt", ["--optimizer", "prodigy"], "--optimizer prodigy needs prodigyopt: pip install"),
    ("bitsandbytes", ["--optimizer", "adamw8bit"], "--optimizer adamw8bit needs bitsandbytes"),
    ("bitsandbytes", ["--use_8bit_adam"], "--use_8bit_adam needs bitsandbytes")])
def test_a_missing_optimizer_package_is_one_line(package, flags, message, tiny_pipeline_dir, tmp_path, monkeypatch,
                                                 capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    _no_models(monkeypatch)
    assert main(_argv(tiny_pipeline_dir(), tmp_path, *flags)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("flags,message", [
    (["--adapter", "loraplus", "--optimizer", "prodigy"], "--adapter loraplus and --optimizer prodigy contradict"),
    (["--optimizer", "prodigy", "--train_text_encoder", "--text_encoder_lr", "0.5"],
     "--text_encoder_lr 0.5 and --optimizer prodigy contradict"),
    (["--text_encoder_lr", "1e-5"], "--text_encoder_lr 1e-05 is set but the text encoders do not train"),
    (["--use_8bit_adam", "--optimizer", "prodigy"], "--use_8bit_adam and --optimizer prodigy contradict"),
    (["--optimizer", "prodigy", "--fused_adamw"], "--fused_adamw is torch's AdamW and --optimizer prodigy")])
def test_contradicting_optimizer_flags_are_one_line(flags, message, tiny_pipeline_dir, tmp_path, monkeypatch, capsys):
    _no_models(monkeypatch)
    assert main(_argv(tiny_pipeline_dir(), tmp_path, *flags)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_prodigy_takes_text_encoder_lr_equal_to_learning_rate(tiny_pipeline_dir, tmp_path):
    cfg = tiny_config(tiny_pipeline_dir(), tmp_path, optimizer="prodigy", learning_rate=None, text_encoder_lr=1.0,
                      train_text_encoder=True)
    validate(cfg)  # the same rate is no contradiction
    with pytest.raises(BadInput):
        validate(tiny_config(tiny_pipeline_dir(), tmp_path, adapter="loraplus", optimizer="prodigy"))
    real = importlib.util.find_spec
    with pytest.MonkeyPatch.context() as m:
        m.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "prodigyopt" else real(name, *a))
        with pytest.raises(MissingDependency):
            validate(cfg)


def test_fused_adamw_and_channels_last_train_what_the_defaults_train(tiny_pipeline_dir, tmp_path, monkeypatch):
    """The speed options change how the step runs, not what it computes: the same adapter (to float
    rounding), with torch's fused AdamW really in use and the UNet's convolutions really NHWC."""
    made = []
    real_opt = loop.make_optimizer
    monkeypatch.setattr(loop, "make_optimizer", lambda *a: made.append(real_opt(*a)) or made[-1])
    weights = {}
    for fast in (False, True):
        out = tmp_path / f"fast_{fast}"
        cfg = tiny_config(tiny_pipeline_dir(), out, fused_adamw=fast, channels_last=fast, validation_prompt=None)
        train(cfg, model_card=False)
        weights[fast] = load_file(str(out / "singlora_weights.safetensors"))
    assert made[0].defaults["foreach"] and not made[0].defaults["fused"]
    assert made[1].defaults["fused"]
    for k in weights[False]:
        torch.testing.assert_close(weights[True][k], weights[False][k], rtol=1e-4, atol=1e-6)


def test_channels_last_puts_the_unet_convolutions_in_nhwc(tiny_pipeline_dir, tmp_path):
    cfg = tiny_config(tiny_pipeline_dir(), tmp_path / "out", channels_last=True)
    trainee = build(cfg, validate(cfg), torch.device("cpu"))
    convs = [m.weight for m in trainee.denoiser.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert not any(w.is_contiguous() for w in convs if w.shape[-1] > 1)  # (1x1 kernels are both layouts)
