"""experiments/attention_toy.py: the paper's Sec. 5 toy, SingLoRA vs LoRA.

The toy trains through a fast algebraic form (batched runs, a surrogate loss without N×N
tensors); these tests hold it to independent references: the library's delta_weight,
PEFT's LoRA layer, separate runs, and a plain dense per-run training loop.
"""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from experiments import attention_toy as toy
from singlora_diffusion import layer

SMALL = dict(dim=16, rows=24, lora_rank=2, ramp_frac=0.1)  # T = 4 steps of 40


def test_quick_end_to_end(tmp_path):
    res = toy.main(["--quick", "--out", str(tmp_path), "--plots", str(tmp_path)])
    data = json.loads((tmp_path / "attention_toy_quick.json").read_text())
    assert set(data) >= {"config", "seconds", "curve_steps", "main", "lr_sweep"}
    assert data["config"]["trainable_params"]["lora"] == data["config"]["trainable_params"]["singlora"] == 2048
    steps = data["curve_steps"]
    assert steps[0] == 0 and steps[-1] == data["config"]["iters"] == 1500
    for fam in toy.FAMILIES:
        for m in toy.METHODS:
            r = data["main"][fam][m]
            assert set(r) >= {"final_per_seed", "final_median", "final_q25", "final_q75", "diverged", "curve"}
            assert len(r["final_per_seed"]) == data["config"]["seeds"] == 3
            assert all(len(r["curve"][k]) == len(steps) for k in ("median", "q25", "q75"))
            # lr 1e-4 is stable: finite losses, and training lowered them
            assert all(v is not None and math.isfinite(v) for v in r["final_per_seed"])
            assert r["final_median"] < r["curve"]["median"][0]
            sweep = data["lr_sweep"][fam][m]
            assert set(sweep) == {"0.0001", "0.01"}
            assert all(v is not None for v in sweep["0.0001"]["final_per_seed"])
    for name in ("attention_toy_quick.png", "attention_toy_lr_quick.png"):
        with Image.open(tmp_path / name) as im:
            im.verify()
            assert im.format == "PNG" and im.size[0] > 300
    assert "LoRA/SingLoRA" in toy.tables(res)


def test_batched_equals_separate_runs():
    """Seeds and lrs batched into one problem give each run exactly its separate result."""
    lrs = [1e-3, 1e-2]
    both = toy.run(toy.FAMILIES, [0, 1], lrs, iters=40, **SMALL)
    for i, seed in enumerate([0, 1]):
        for lr in lrs:
            one = toy.run(toy.FAMILIES, [seed], [lr], iters=40, **SMALL)
            for f in toy.FAMILIES:
                for m in toy.METHODS:
                    a, b = both["loss"][f][m][lr][:, i], one["loss"][f][m][lr][:, 0]
                    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8, err_msg=f"{f}/{m}/{lr}/{seed}")
                    assert a[-1] < a[0]  # the runs did move


@pytest.mark.parametrize("method", toy.METHODS)
def test_training_matches_dense_reference(method):
    """The fast path (low-rank factors, surrogate loss, lr axis) against the textbook loop:
    dense W = W0 + ΔW, ΔW from layer.delta_weight (SingLoRA) or B·A (LoRA), loss
    mean((X Wqᵀ Wk Xᵀ − Z)²), torch AdamW with the trainer's defaults."""
    iters, T, lr = 30, 4, 1e-2
    prob = toy.make_problem("singlora", [5], SMALL["dim"], SMALL["rows"], SMALL["lora_rank"])
    init = toy.init_params(method, [5], SMALL["dim"], SMALL["lora_rank"])
    fast = toy.train(prob, method, init, [lr], iters, T, list(range(iters + 1)))[:, 0, 0]

    X, Wq0, Wk0 = prob["X"][0], prob["Wq0T"][0].T, prob["Wk0T"][0].T
    Z = X @ Wq0.T @ Wk0 @ X.T - prob["R0"][0]
    p = {k: v[0].clone().requires_grad_() for k, v in init.items()}
    opt = torch.optim.AdamW(p.values(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    d = SMALL["dim"]
    ref = []
    for t in range(iters + 1):
        if method == "singlora":  # α = r: coef = u(t)
            dq, dk = (layer.delta_weight(p[k], d, d, layer.ramp(t, T)) for k in ("Aq", "Ak"))
        else:
            dq, dk = p["Bq"] @ p["Aq_t"].T, p["Bk"] @ p["Ak_t"].T
        loss = ((X @ (Wq0 + dq).T) @ (X @ (Wk0 + dk).T).T - Z).square().mean()
        ref.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    np.testing.assert_allclose(fast, ref, rtol=2e-4, atol=1e-7)
    assert ref[-1] < 0.5 * ref[0]


def test_singlora_update_is_the_library_math():
    d, r_l = 32, 3
    p = toy.init_params("singlora", [3], d, r_l)
    # init: layer.init_singlora_A with the seed's own generator, rank 2·r_l
    g = toy.gen(3, 10 + toy.METHODS.index("singlora"))
    torch.testing.assert_close(p["Aq"][0], layer.init_singlora_A(d, 2 * r_l, g), rtol=0, atol=0)
    torch.testing.assert_close(p["Ak"][0], layer.init_singlora_A(d, 2 * r_l, g), rtol=0, atol=0)
    T = 20
    assert [float(toy.coef("singlora", t, T)) for t in (0, 7, 20, 45)] == pytest.approx([0, 0.35, 1, 1])
    for t in (0, 7, 45):
        c = toy.coef("singlora", t, T)
        dq, dk = toy.delta_weights("singlora", p, c)
        torch.testing.assert_close(dq[0], layer.delta_weight(p["Aq"][0], d, d, layer.ramp(t, T)))
        torch.testing.assert_close(dk[0], layer.delta_weight(p["Ak"][0], d, d, layer.ramp(t, T)))


def test_lora_update_and_init_match_peft():
    from peft import LoraConfig, inject_adapter_in_model

    d, r = 24, 4
    model = inject_adapter_in_model(LoraConfig(r=r, lora_alpha=r, target_modules=["q"]),
                                    nn.ModuleDict({"q": nn.Linear(d, d, bias=False)}))
    lin = model["q"]
    A, B = torch.randn(r, d), torch.randn(d, r)  # B ≠ 0, so the product is really tested
    with torch.no_grad():
        lin.lora_A["default"].weight.copy_(A)
        lin.lora_B["default"].weight.copy_(B)
    p = {"Aq_t": A.T[None], "Bq": B[None], "Ak_t": A.T[None], "Bk": B[None]}
    dq, _ = toy.delta_weights("lora", p, toy.coef("lora", 0, 10))
    torch.testing.assert_close(dq[0], lin.get_delta_weight("default"))
    # init: PEFT's reset (Kaiming-uniform a=√5 on A, B = 0) from the same RNG state
    seed = 2
    torch.manual_seed(1000 * seed + 10 + toy.METHODS.index("lora"))  # the toy's stream for q
    lin.reset_lora_parameters("default", True)
    ours = toy.init_params("lora", [seed], d, r)
    torch.testing.assert_close(ours["Aq_t"][0].T, lin.lora_A["default"].weight.detach(), rtol=0, atol=0)
    assert not ours["Bq"].any() and not lin.lora_B["default"].weight.any()


def test_divergence_is_recorded_not_fatal():
    q25, med, q75 = toy.quantiles(np.array([1.0, 2.0, np.nan, np.inf, 3.0]))
    assert (q25, med) == (2.0, 3.0) and q75 == np.inf
    s = toy.summarize(np.array([[1.0, 1.0, 1.0], [np.nan, np.inf, 2.0]]))
    assert s["final_per_seed"] == [None, None, 2.0] and s["diverged"] == 2 and s["final_median"] is None
    assert toy.fmt(s) == "diverged (2/3)"
    json.dumps(s, allow_nan=False)  # strict JSON: null, never NaN/Infinity
