"""SingLoRA math against float64 references, the ramp, the initialisation and precision."""
import math

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from singlora_diffusion import SingLoRALinear, attach_ramp, delta_weight, init_singlora_A, ramp


def reference_delta(A: torch.Tensor, d_out: int, d_in: int, alpha: float, rank: int, u: float):
    """ΔW = (α/r)·u·A[:d_out]·A[:d_in]ᵀ in float64, written from the spec, not from the code."""
    A = A.double()
    return (alpha / rank) * u * (A[:d_out] @ A[:d_in].T)


SHAPES = [(24, 24), (40, 24), (24, 40)]  # (d_out, d_in): square, d_out > d_in, d_in > d_out


def _layer(d_out, d_in, rank=4, alpha=8.0, T=10, step=5, seed=0):
    torch.manual_seed(seed)
    layer = SingLoRALinear(nn.Linear(d_in, d_out), rank, alpha, ramp_up_steps=T,
                           generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        layer.singlora_A.mul_(4)  # a trained-looking A: ΔW clearly non-zero
    layer.singlora_step.fill_(step)
    return layer


@pytest.mark.parametrize("d_out,d_in", SHAPES)
def test_delta_weight_matches_float64_reference(d_out, d_in):
    layer = _layer(d_out, d_in)
    assert layer.singlora_A.shape == (max(d_in, d_out), 4)
    ref = reference_delta(layer.singlora_A, d_out, d_in, 8.0, 4, 0.5)
    got = layer.delta_weight()
    assert got.shape == (d_out, d_in) == layer.base_layer.weight.shape
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("d_out,d_in", SHAPES)
def test_forward_matches_float64_reference(d_out, d_in):
    layer = _layer(d_out, d_in)
    x = torch.randn(3, 7, d_in)
    W0, b = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    ref = x.double() @ (W0 + reference_delta(layer.singlora_A, d_out, d_in, 8.0, 4, 0.5)).T + b
    torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-5)
    # per-call scale multiplies only the update
    ref_half = x.double() @ (W0 + 0.5 * reference_delta(layer.singlora_A, d_out, d_in, 8.0, 4, 0.5)).T + b
    torch.testing.assert_close(layer(x, scale=0.5).double(), ref_half, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x, scale=0.0), layer.base_layer(x))


@pytest.mark.parametrize("T", [8, 10, 1000])
def test_ramp_values(T):
    for t, expected in [(0, 0.0), (T // 2, (T // 2) / T), (T, 1.0), (2 * T, 1.0)]:
        assert float(ramp(t, T)) == pytest.approx(expected)
    assert float(ramp(0, 0)) == 1.0  # T = 0: no ramp


def test_ramp_scales_the_update():
    layer = _layer(16, 16, T=10, step=0)
    x = torch.randn(2, 16)
    torch.testing.assert_close(layer(x), layer.base_layer(x))  # u(0) = 0
    layer.singlora_step.fill_(20)
    full = layer.delta_weight()
    layer.singlora_step.fill_(5)
    torch.testing.assert_close(layer.delta_weight(), 0.5 * full)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = SingLoRALinear(nn.Linear(8, 8), 2, ramp_up_steps=100)
        self.k = SingLoRALinear(nn.Linear(8, 12), 2, ramp_up_steps=100)

    def forward(self, x):
        return self.k(self.q(x))


def test_step_advances_per_optimizer_step_not_per_forward():
    model = _Tiny()
    opt = torch.optim.AdamW([p for n, p in model.named_parameters() if "singlora_A" in n], lr=1e-3)
    attach_ramp(opt, model)
    for _ in range(5):
        model(torch.randn(2, 8))  # forward calls alone never move the ramp
    assert int(model.q.singlora_step) == 0
    # gradient checkpointing re-runs forward during backward: still no step
    y = checkpoint(model, torch.randn(2, 8), use_reentrant=False)
    y.sum().backward()
    assert int(model.q.singlora_step) == 0
    opt.step()
    assert int(model.q.singlora_step) == int(model.k.singlora_step) == 1


def test_step_advances_once_per_accumulated_step_with_accelerate():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=4)
    model = _Tiny()
    opt = torch.optim.AdamW([model.q.singlora_A, model.k.singlora_A], lr=1e-3)
    model, opt = accelerator.prepare(model, opt)
    attach_ramp(opt, model)
    for _ in range(12):  # 12 micro-batches = 3 optimizer steps
        with accelerator.accumulate(model):
            accelerator.backward(model(torch.randn(2, 8)).pow(2).mean())
            opt.step()
            opt.zero_grad()
    assert int(model.q.singlora_step) == 3


def test_init_entries_are_theta_n_to_minus_half_and_delta_norm_is_order_one():
    n, r = 1280, 8
    A = init_singlora_A(n, r, torch.Generator().manual_seed(0))
    assert A.dtype == torch.float32 and A.shape == (n, r)
    assert A.abs().max() <= 1 / math.sqrt(n)
    assert A.std().item() == pytest.approx(1 / math.sqrt(3 * n), rel=0.05)  # uniform(±n^-1/2)
    norm = torch.linalg.matrix_norm(delta_weight(A, n, n, 1.0), ord=2).item()
    assert 0.2 < norm < 1.0, norm  # the issue's ≈ 0.4
    # PyTorch's default init of an (n, r) tensor uses fan_in = r: the reported collapse
    bad = torch.empty(n, r)
    nn.init.kaiming_uniform_(bad, a=math.sqrt(5), generator=torch.Generator().manual_seed(0))
    assert torch.linalg.matrix_norm(delta_weight(bad, n, n, 1.0), ord=2).item() > 30


def test_init_is_seedable():
    a = init_singlora_A(64, 4, torch.Generator().manual_seed(1))
    b = init_singlora_A(64, 4, torch.Generator().manual_seed(1))
    c = init_singlora_A(64, 4, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def _one_adamw_step(layer, lr=1e-5):
    opt = torch.optim.AdamW([layer.singlora_A], lr=lr, weight_decay=0.0)
    before = layer.singlora_A.detach().clone()
    x = torch.randn(4, layer.d_in, dtype=layer.base_layer.weight.dtype)
    layer(x).float().pow(2).mean().backward()
    opt.step()
    return (layer.singlora_A.detach().float() != before.float()).float().mean().item()  # fraction changed


def test_bf16_base_keeps_A_float32_and_small_updates_survive():
    n = 1280
    layer = SingLoRALinear(nn.Linear(n, n).to(torch.bfloat16), 8, ramp_up_steps=1000)
    layer.singlora_step.fill_(1)  # u(t) = 1e-3
    assert layer.singlora_A.dtype == torch.float32
    assert _one_adamw_step(layer) > 0.99  # AdamW moves each entry by ~lr = 1e-5
    # The failure mode guarded against: on a bf16 A the same update rounds away for all
    # but the entries near zero (bf16 spacing at |a| ~ n^-1/2 is ~1e-4 ≫ 1e-5).
    bf16 = SingLoRALinear(nn.Linear(n, n).to(torch.bfloat16), 8, ramp_up_steps=1000)
    bf16.singlora_step.fill_(1)
    bf16.singlora_A.data = bf16.singlora_A.data.to(torch.bfloat16)
    assert _one_adamw_step(bf16) < 0.2


def test_casting_the_model_keeps_A_float32_and_exact():
    layer = SingLoRALinear(nn.Linear(16, 16), 4)
    A = layer.singlora_A.detach().clone()
    layer.to(torch.bfloat16)
    assert layer.base_layer.weight.dtype == torch.bfloat16
    assert layer.singlora_A.dtype == torch.float32 and torch.equal(layer.singlora_A.detach(), A)
    layer.half()
    assert layer.singlora_A.dtype == torch.float32 and torch.equal(layer.singlora_A.detach(), A)


def test_adapter_path_runs_in_float32_under_autocast():
    layer = _layer(32, 32, step=10)
    with torch.no_grad():
        layer.base_layer.weight.zero_()
        layer.base_layer.bias.zero_()
    x = torch.randn(5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16  # cast back to the base's output dtype
    ref = x.double() @ reference_delta(layer.singlora_A, 32, 32, 8.0, 4, 1.0).T
    # only the final cast to bf16 rounds: relative error ≤ 2^-8
    torch.testing.assert_close(y.double(), ref, rtol=2 ** -8, atol=1e-6)


def test_gradients_only_on_A():
    layer = _layer(12, 20, step=10)
    layer.base_layer.requires_grad_(False)
    layer(torch.randn(3, 20)).sum().backward()
    assert layer.singlora_A.grad is not None and layer.singlora_A.grad.abs().sum() > 0
    assert layer.base_layer.weight.grad is None and layer.base_layer.bias.grad is None


@pytest.mark.parametrize("d_out,d_in", SHAPES)
def test_merge_equals_unmerged_forward_and_is_idempotent(d_out, d_in):
    layer = _layer(d_out, d_in)
    W0 = layer.base_layer.weight.detach().clone()
    x = torch.randn(6, d_in)
    y = layer(x)
    layer.merge()
    layer.merge()  # twice: harmless
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.base_layer.weight.double(), W0.double() + reference_delta(
        layer.singlora_A, d_out, d_in, 8.0, 4, 0.5), rtol=1e-6, atol=1e-6)
    layer.unmerge()
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, W0, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), y)


def test_rank_larger_than_layer_is_refused():
    with pytest.raises(ValueError, match="rank 40"):
        SingLoRALinear(nn.Linear(16, 32), 40)


def test_casting_the_model_keeps_the_gradient_of_A_float32():
    layer = _layer(16, 24, step=10)
    layer(torch.randn(3, 24)).sum().backward()
    grad = layer.singlora_A.grad.clone()
    layer.to(torch.bfloat16)
    assert layer.singlora_A.grad.dtype == torch.float32 and torch.equal(layer.singlora_A.grad, grad)


@pytest.mark.parametrize("d_out,d_in", SHAPES)
def test_a_new_scale_on_a_merged_layer_re_merges(d_out, d_in):
    layer = _layer(d_out, d_in)
    W0 = layer.base_layer.weight.detach().double().clone()
    x = torch.randn(5, d_in)
    layer.merge()
    layer.scale = 0.25  # must not be ignored by the merged layer
    assert layer.merged_coef is not None
    ref = 0.25 * reference_delta(layer.singlora_A, d_out, d_in, 8.0, 4, 0.5)
    torch.testing.assert_close(layer.base_layer.weight.double(), W0 + ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer(x).double(), x.double() @ (W0 + ref).T + layer.base_layer.bias.double(),
                               rtol=1e-5, atol=1e-5)
    layer.merge(scale=1.0)  # merge at another scale: the same re-merge
    torch.testing.assert_close(layer.base_layer.weight.double(), W0 + 4 * ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="merged at scale 1"):
        layer(x, scale=0.5)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight.double(), W0, rtol=0, atol=1e-6)


@pytest.mark.parametrize("d_out,d_in", SHAPES)
def test_ramp_fast_path_follows_the_step_through_advance_set_and_load(d_out, d_in):
    """Once u = 1 the layer stops computing u on tensors; every way the step moves must still
    give the float64 reference, including moving it back below T (resume from an early checkpoint)."""
    layer = _layer(d_out, d_in, T=3, step=0)
    x = torch.randn(5, d_in, dtype=torch.float64)
    W, b = layer.base_layer.weight.double(), layer.base_layer.bias.double()

    def check(u):
        ref = x @ (W + reference_delta(layer.singlora_A, d_out, d_in, 8.0, 4, u)).T + b
        torch.testing.assert_close(layer(x.float()).double(), ref, rtol=1e-5, atol=1e-5)

    for step in range(1, 5):
        layer.advance_step()
        check(min(step / 3, 1.0))
    assert isinstance(layer.coef(), float)  # the fast path is really taken past T
    layer.set_step(1)
    check(1 / 3)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.set_step(7)
    check(1.0)
    layer.load_state_dict(state)  # back to step 1, through the buffer only
    check(1 / 3)
    layer.advance_step(2)
    check(1.0)
