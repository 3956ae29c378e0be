"""Benchmarks stay runnable (their --quick paths run end to end; no timing is asserted), and what they count or
compare is right: exact work counts against the layer shapes, experimental variants against float64."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_adapter_overhead_quick(tmp_path):
    out = subprocess.run([sys.executable, "-m", "bench.adapter_overhead", "--quick", "--json", str(tmp_path / "r.json")],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "singlora" in out.stdout and "x LoRA" in out.stdout
    assert json.loads((tmp_path / "r.json").read_text())


def test_adapter_work_above_the_floor_is_the_adapters_own_matmuls():
    # Reference from the layers' shapes alone: per target layer with M input rows, the two thin
    # matmuls x·(d_in×r)·(r×d_out) cost 2·M·r·(d_in + d_out) forward; backward, the weight
    # gradients the same again, and the gradients of h and of x (the latter only when x needs grad).
    from bench import adapter_overhead as B
    from singlora_diffusion.targets import find_targets

    s, rank = B.SETTINGS["quick"], 4
    floor = B.Trainer(B.FLOOR, rank, s, "attn")
    expected = 0

    def count(module, inputs, output):
        nonlocal expected
        x = inputs[0]
        m, d_in, d_out = x.numel() // x.shape[-1], module.in_features, module.out_features
        expected += 2 * m * rank * (2 * (d_in + d_out) + d_out + (d_in if x.requires_grad else 0))

    for name in find_targets(floor.unet, "attn", "unet"):
        floor.unet.get_submodule(name).register_forward_hook(count)
    base = B.work_per_step(floor)
    assert expected > 0
    for method in ("lora", "singlora"):
        work = B.work_per_step(B.Trainer(method, rank, s, "attn"))
        assert work["flops"] - base["flops"] == expected, method
        assert work["ops"] > base["ops"]


def test_adapter_alternatives_compute_singloras_update_and_gradients():
    # The variants timed by bench/adapter_alternatives.py must do SingLoRA's work, or their times
    # say nothing: outputs and gradients against float64 autograd of x·A·Aᵀ summed over q, k, v.
    import torch

    from bench import adapter_alternatives as B

    x0 = torch.randn(2, 6, 16, dtype=torch.float64)
    torch.autograd.gradcheck(B.RowsOut.apply, (x0.clone().requires_grad_(), torch.randn(16, 4, dtype=torch.float64,
                             requires_grad=True), torch.randn(12, 4, dtype=torch.float64, requires_grad=True)))
    for method in ("singlora rows-out", "singlora fused down"):
        model = B.qkv(16, 4, method)
        x = x0.float().requires_grad_()
        model.forward(x).sum().backward()
        As = [model.layers[n].singlora_A for n in ("to_q", "to_k", "to_v")]
        bases = [model.layers[n].base_layer for n in ("to_q", "to_k", "to_v")]
        xr, Ar = x0.clone().requires_grad_(), [A.detach().double().requires_grad_() for A in As]
        ref = sum(xr @ b.weight.double().t() + b.bias.double() + xr @ A @ A.t() for b, A in zip(bases, Ar))
        ref.sum().backward()
        assert torch.allclose(model.forward(x.detach()).double(), ref, atol=1e-5), method
        assert torch.allclose(x.grad.double(), xr.grad, atol=1e-5), method
        for A, a in zip(As, Ar):
            assert torch.allclose(A.grad.double(), a.grad, atol=1e-4), method


def test_adapter_alternatives_quick():
    out = subprocess.run([sys.executable, "-m", "bench.adapter_alternatives", "--quick"], cwd=ROOT,
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Table 2" in out.stdout and "fused down" in out.stdout


def test_compile_cost_quick():
    out = subprocess.run([sys.executable, "-m", "bench.compile_cost", "--quick"], cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| tiny:sd15")]
    assert [r.split(" | ")[1] for r in rows] == ["eager", "compile, cold cache", "compile, warm cache"], out.stdout
    files = [r.strip(" |").split(" | ")[-1] for r in rows]
    assert files[0] == "-" and int(files[1]) > 0, out.stdout  # the compiled run compiled, into its own cache
