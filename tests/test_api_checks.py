"""The library API's input checks: a user's mistake is one gelugemm error that says what is
wrong and what was expected, raised where the mistake enters (building a FusedGeluMLP, a
QuantizedWeight, quantizing a weight, loading a state dict, planning swaps), never a torch
RuntimeError, AssertionError or AttributeError from deep inside, and never a silent wrong
result (a wrong-width output, truncated int values, float weights zeroed in an int8 buffer).

Each case below passed silently or failed with a raw torch/Python error before its check.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from calibration.model import SwapError, Swaps, plan_swaps, swap_mlps
from calibration.quantize_mlp import quantize_mlp
from kernels.errors import BackendUnavailable, LaunchError
from kernels.int8 import quantize_weight, weight_scale
from kernels.module import FusedGeluMLP
from kernels.op import MLPConfig
from kernels.quantized import QuantizedWeight
from kernels.schemes import SchemeError

D, F = 32, 64
FP32 = MLPConfig(dtype="fp32", backend="torch")


def weights(d: int = D, f: int = F) -> tuple[torch.Tensor, ...]:
    """(w1 [F, D], b1 [F], w2 [D, F], b2 [D]) float32, out_in."""
    return torch.randn(f, d) / d**0.5, torch.randn(f), torch.randn(d, f) / f**0.5, torch.randn(d)


# ---- 1. every weight and bias against the others, at construction ---------------------------


def test_consistent_weights_build_and_run():
    w1, b1, w2, b2 = weights()
    module = FusedGeluMLP(w1, b1, w2, b2, FP32)
    assert (module.d_model, module.d_ff) == (D, F)
    assert module(torch.randn(4, D)).shape == (4, D)


def _build(case: str):
    w1, b1, w2, b2 = weights()
    t = lambda v: v.t().contiguous()  # noqa: E731
    in_out = MLPConfig(dtype="fp32", weight_layout="in_out", backend="torch")
    gated = MLPConfig(dtype="fp32", gated=True, backend="torch")
    builds = {
        "w2 rows": lambda: FusedGeluMLP(w1, b1, torch.randn(D + 8, F), None, FP32),
        "w2 d_ff": lambda: FusedGeluMLP(w1, None, torch.randn(D, F + 3), None, FP32),
        "b1 length": lambda: FusedGeluMLP(w1, torch.randn(F + 1), w2, None, FP32),
        "b2 length": lambda: FusedGeluMLP(w1, b1, w2, torch.randn(D + 1), FP32),
        "b1 2-D": lambda: FusedGeluMLP(w1, b1[None], w2, b2, FP32),
        "in_out w2": lambda: FusedGeluMLP(t(w1), b1, torch.randn(F + 3, D), b2, in_out),
        "w_up": lambda: FusedGeluMLP(w1, None, w2, None, gated, w_up=torch.randn(F + 2, D)),
        "odd concatenated": lambda: FusedGeluMLP(torch.randn(2 * F + 1, D), None, w2, None, gated),
        "b_up without w_up": lambda: FusedGeluMLP(torch.randn(2 * F, D), None, w2, None, gated, b_up=b1),
        "b1 without b_up": lambda: FusedGeluMLP(w1, b1, w2, None, gated, w_up=torch.randn(F, D)),
        "w1 1-D": lambda: FusedGeluMLP(w1.flatten(), b1, w2, b2, FP32),
        "w1 empty": lambda: FusedGeluMLP(torch.randn(0, D), None, torch.randn(D, 0), None, FP32),
    }
    return builds[case]()


@pytest.mark.parametrize(
    "case,message",
    [
        ("w2 rows", r"w2 has shape \(40, 64\), expected \(32, 64\) = \[d_model, d_ff\] \(out_in\): w1 \(64, 32\) \(out_in\) makes d_model=32, d_ff=64"),
        ("w2 d_ff", r"w2 has shape \(32, 67\), expected \(32, 64\)"),
        ("b1 length", r"b1 has shape \(65,\), expected \(64,\) = \(d_ff,\)"),
        ("b2 length", r"b2 has shape \(33,\), expected \(32,\) = \(d_model,\)"),
        ("b1 2-D", r"b1 has shape \(1, 64\), expected \(64,\)"),
        ("in_out w2", r"w2 has shape \(67, 32\), expected \(64, 32\) = \[d_ff, d_model\] \(in_out\)"),
        ("w_up", r"w_up has shape \(66, 32\), expected \(64, 32\) = \[d_ff, d_model\]"),
        ("odd concatenated", r"has 129 outputs; a gated MLP without w_up holds gate and up as the halves"),
        ("b_up without w_up", r"b_up goes with w_up"),
        ("b1 without b_up", r"a bias each, or neither has one: b1 is given, b_up is None"),
        ("w1 1-D", r"w1 must be a 2-D weight, \[d_ff, d_model\] in layout out_in; got shape \(2048,\)"),
        ("w1 empty", r"w1 has an empty dim: shape \(0, 32\)"),
    ],
)
def test_inconsistent_weights_are_refused_at_construction(case, message):
    with pytest.raises(LaunchError, match=message):
        _build(case)


def test_from_linears_checks_the_linears_against_each_other():
    fc1, fc2 = nn.Linear(D, F), nn.Linear(F, D)
    with pytest.raises(LaunchError, match=r"w2 has shape \(32, 66\), expected \(32, 64\)"):
        FusedGeluMLP.from_linears(fc1, nn.Linear(F + 2, D))
    with pytest.raises(LaunchError, match=r"w_up has shape \(66, 32\), expected \(64, 32\)"):
        FusedGeluMLP.from_linears(fc1, fc2, up=nn.Linear(D, F + 2))
    with pytest.raises(LaunchError, match=r"fc1 must be a linear layer \(nn.Linear, with a weight\), got Identity"):
        FusedGeluMLP.from_linears(nn.Identity(), fc2)
    with pytest.raises(LaunchError, match=r"fc1 must be a linear layer with a 2-D \[out, in\] weight; Conv1d's weight has shape \(64, 32, 1\)"):
        FusedGeluMLP.from_linears(nn.Conv1d(D, F, 1), fc2)
    with pytest.raises(LaunchError, match=r"fc2 is a Conv1D, which stores its weight \[in, out\].*weight_layout='in_out'"):
        FusedGeluMLP.from_linears(fc1, Conv1D(D, F))
    with pytest.raises(LaunchError, match=r"from_linears builds a float MLP: dtype must be fp16, bf16, fp32 or None, got 'w8a8'"):
        FusedGeluMLP.from_linears(fc1, fc2, dtype="w8a8")


def test_quantized_scales_are_checked_at_construction():
    w1, b1, w2, b2 = weights()
    x = torch.randn(16, D)
    q1, q2 = quantize_mlp(w1, b1, w2, x, scheme="w8a8", activations="static", smooth=0.5)
    config = MLPConfig(dtype="w8a8", activations="static", backend="torch")
    assert FusedGeluMLP(q1, b1, q2, b2, config).d_ff == F
    bad = QuantizedWeight(q2.data, q2.scale[:-1], input_scale=q2.input_scale)
    with pytest.raises(LaunchError, match=r"w2 has per-channel scales: scale must have shape \(32,\), got \(31,\)"):
        FusedGeluMLP(q1, b1, bad, b2, config)
    q1.smooth_scale = q1.smooth_scale[:-2]
    with pytest.raises(LaunchError, match=r"w1.smooth_scale has shape \(30,\), expected \(32,\)"):
        FusedGeluMLP(q1, b1, q2, b2, config)
    q1.smooth_scale, q1.input_scale = None, 0.03  # assigned after the QuantizedWeight was built
    with pytest.raises(LaunchError, match=r"w1: input_scale must be None or a one-element float32 tensor .* got float 0.03"):
        FusedGeluMLP(q1, b1, q2, b2, config)


# ---- swap compares d_model, d_ff and the output width ----------------------------------------


class Block(nn.Module):
    """An MLP module called on one tensor: replaced whole (fc2 may give another width)."""

    def __init__(self, d: int = D, f: int = F, out: int = D):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, f), nn.GELU(), nn.Linear(f, out)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Net(nn.Module):
    def __init__(self, out: int = D):
        super().__init__()
        self.layers = nn.ModuleList([nn.Module()])
        self.layers[0].mlp = Block(out=out)
        self.a, self.b = nn.Linear(D, D), nn.Linear(D, F)


def test_swap_checks_the_output_width_as_well_as_fc1():
    fused = FusedGeluMLP(*weights(), FP32)
    message = r"the model's layers.0.mlp.fc2 \(fc2\) takes d_ff=64 and outputs 40 features, but the new MLP is d_ff=64 and outputs d_model=32"
    for find in (None, {"layers.0.mlp.fc1": "layers.0.mlp"}):
        net = Net(out=D + 8)
        original = net.layers[0].mlp
        with pytest.raises(SwapError, match=message):
            swap_mlps(net, {"layers.0.mlp.fc1": fused}, find=find)
        assert net.layers[0].mlp is original
    # a linear replaced whole must take and give d_model
    with pytest.raises(SwapError, match=r"the model's b takes 32 and outputs 64 features, but the new MLP takes and outputs d_model=32"):
        swap_mlps(Net(), {"p": fused}, find={"p": "b"})
    assert swap_mlps(Net(), {"p": fused}, find={"p": "a"}) == ["a"]
    net = Net()
    assert swap_mlps(net, {"layers.0.mlp.fc1": fused}) == ["layers.0.mlp"] and net.layers[0].mlp is fused


def test_swapped_fc1_and_fc2_are_a_swap_error():
    net = Net()
    block = net.layers[0].mlp
    backwards = FusedGeluMLP.from_linears(block.fc2, block.fc1)  # consistent shapes, d_model=64
    with pytest.raises(SwapError, match=r"is d_model=32, d_ff=64 but the new MLP is d_model=64, d_ff=32"):
        swap_mlps(net, {"layers.0.mlp.fc1": backwards})
    with pytest.raises(LaunchError):  # and run alone, the op refuses x's width
        backwards(torch.randn(2, D))


# ---- 7. every replacement is checked before any is made --------------------------------------


def test_swap_checks_every_replacement_before_replacing_any():
    net = Net()
    a, b = net.a, net.b
    good = FusedGeluMLP(*weights(), FP32)
    with pytest.raises(SwapError, match=r"'q': the replacement must be a torch.nn.Module .* got Tensor"):
        swap_mlps(net, {"p": good, "q": torch.zeros(3)}, find={"p": "a", "q": "b"})
    assert net.a is a and net.b is b
    with pytest.raises(SwapError, match=r"mlps must be a mapping \{fc1 prefix: module\}"):
        swap_mlps(net, [good])
    with pytest.raises(SwapError, match=r"find= must be a function or a dict"):
        swap_mlps(net, {"p": good}, find="a")
    with pytest.raises(SwapError, match=r"'p' maps to None, which Net does not have"):
        swap_mlps(net, {"p": good}, find=lambda prefix: None)
    assert net.a is a and net.b is b


def test_a_failed_apply_puts_back_what_it_replaced(monkeypatch):
    net = Net()
    a = net.a
    good = FusedGeluMLP(*weights(), FP32)
    swaps = plan_swaps(net, {"p": good, "q": FusedGeluMLP(*weights(), FP32)}, find={"p": "a", "q": "layers.0.mlp"})
    real_set, calls = Swaps._set, []

    def failing_set(self, path, module):
        calls.append(path)
        if len(calls) == 2:
            raise RuntimeError("boom")
        real_set(self, path, module)

    monkeypatch.setattr(Swaps, "_set", failing_set)
    with pytest.raises(RuntimeError, match="boom"):
        swaps.apply()
    assert net.a is a and not swaps.applied


# ---- 2. forward takes float input only ------------------------------------------------------


@pytest.mark.parametrize("x", [torch.ones(4, D, dtype=torch.int32), torch.ones(4, D, dtype=torch.bool), [[1.0] * D]],
                         ids=["int32", "bool", "list"])  # fmt: skip
def test_forward_refuses_non_float_input(x):
    module = FusedGeluMLP(*weights(), MLPConfig(dtype="fp16", backend="torch"))
    what = "list" if isinstance(x, list) else str(x.dtype)
    with pytest.raises(LaunchError, match=rf"x must be a floating-point tensor \[..., d_model=32\], got {what}"):
        module(x)
    assert module(torch.randn(4, D, dtype=torch.float64)).dtype == torch.float64


# ---- 3. load_state_dict does not cast values into another kind of buffer --------------------


def test_load_state_dict_refuses_float_weights_for_int8_buffers():
    w1, b1, w2, b2 = weights()
    q1, q2 = quantize_mlp(w1, b1, w2, scheme="w8a16")
    module = FusedGeluMLP(q1, b1, q2, b2, MLPConfig(dtype="w8a16", backend="torch"))
    before = module.w1.clone()
    state = module.state_dict()
    with pytest.raises(LaunchError, match=r"load_state_dict: w1 is torch.float32 but this w8a16 module's w1 holds torch.int8: copying would cast"):
        module.load_state_dict({**state, "w1": w1})
    assert torch.equal(module.w1, before)
    with pytest.raises(LaunchError, match=r"load_state_dict: w2 has shape \(32, 60\) but this module's w2 has shape \(32, 64\)"):
        module.load_state_dict({**state, "w2": state["w2"][:, :60]})
    # the module's own state dict loads, also as part of a model (key prefix)
    module.load_state_dict(state)
    parent = nn.Sequential(module)
    parent.load_state_dict(parent.state_dict())
    with pytest.raises(LaunchError, match=r"0.w1 is torch.float32"):
        parent.load_state_dict({**parent.state_dict(), "0.w1": w1})


def test_load_state_dict_refuses_int8_weights_for_float_buffers():
    w1, b1, w2, b2 = weights()
    module = FusedGeluMLP(w1, b1, w2, b2, MLPConfig(dtype="fp16", backend="torch"))
    state = module.state_dict()
    with pytest.raises(LaunchError, match=r"w1 is torch.int8 but this fp16 module's w1 holds torch.float16"):
        module.load_state_dict({**state, "w1": quantize_weight(w1).data})
    module.load_state_dict({k: v.float() for k, v in state.items()})  # a float cast, as construction casts
    assert module.w1.dtype == torch.float16
    with pytest.raises(LaunchError, match=r"assign=True.*must stay torch.float16"):
        module.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)


# ---- 4. devices --------------------------------------------------------------------------------


def test_devices_torch_cannot_use_are_gelugemm_errors():
    w1, b1, w2, b2 = weights()
    with pytest.raises(LaunchError, match=r"device must be a torch device or its name .* got 'banana'"):
        FusedGeluMLP(w1, b1, w2, b2, FP32, device="banana")
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match=r"device 'cuda' asked for, but torch sees no CUDA device"):
            FusedGeluMLP(w1, b1, w2, b2, FP32, device="cuda")
    else:
        with pytest.raises(BackendUnavailable, match=r"torch sees \d+ CUDA device"):
            FusedGeluMLP(w1, b1, w2, b2, FP32, device=f"cuda:{torch.cuda.device_count()}")
    with pytest.raises(LaunchError, match=r"on different devices \(w1 on cpu, w2 on meta, b1 on cpu, b2 on cpu\); pass device="):
        FusedGeluMLP(w1, b1, w2.to("meta"), b2, FP32)
    assert FusedGeluMLP(w1, b1, w2.to("meta"), b2, FP32, device="meta").w1.device.type == "meta"
    if importlib.util.find_spec("torch_xla") is None:
        with pytest.raises(BackendUnavailable, match=r"device 'xla' asked for, but torch cannot use it here"):
            FusedGeluMLP(w1, b1, w2, b2, FP32, device="xla")


# ---- 5. wrong types: one clear error, not an AttributeError --------------------------------


def test_quantized_weight_checks_its_fields_types():
    q = quantize_weight(torch.randn(F, D))
    cases = [
        (lambda: QuantizedWeight(q.data, 0.01), LaunchError, r"weight scale must be a float32 tensor .* got float 0.01"),
        (lambda: QuantizedWeight(q.data, q.scale, input_scale=0.03), LaunchError,
         r"input_scale must be None or a one-element float32 tensor .* got float 0.03"),
        (lambda: QuantizedWeight(q.data, q.scale, output_scale=torch.ones(3)), LaunchError,
         r"output_scale must be None or a one-element float32 tensor .* got a torch.float32 tensor of shape \(3,\)"),
        (lambda: QuantizedWeight(q.data, q.scale, input_scale=torch.tensor(0.1, dtype=torch.float16)), LaunchError,
         r"input_scale .* got a torch.float16 tensor"),
        (lambda: QuantizedWeight(q.data, q.scale, smooth_scale=torch.ones(1, D)), LaunchError, r"smooth_scale must be None or a float32 \[K\] tensor"),
        (lambda: QuantizedWeight(q.data.tolist(), q.scale), LaunchError, r"data must be a 2-D int8 tensor, got list"),
        (lambda: QuantizedWeight(q.data, q.scale, group_size=True), SchemeError, r"group_size must be a positive int or None, got True"),
        (lambda: QuantizedWeight(q.data, q.scale, group_size=0), SchemeError, r"group_size must be a positive int or None, got 0"),
    ]  # fmt: skip
    for build, error, message in cases:
        with pytest.raises(error, match=message):
            build()
    assert QuantizedWeight(q.data, q.scale, input_scale=torch.tensor([0.1])).input_scale.shape == (1,)


def test_wrong_types_for_the_module_are_launch_errors():
    w1, b1, w2, b2 = weights()
    with pytest.raises(LaunchError, match=r"config must be an MLPConfig .* got NoneType"):
        FusedGeluMLP(w1, b1, w2, b2, None)
    with pytest.raises(LaunchError, match=r"w1 must be a floating-point tensor \(the weights are cast to fp32\), got torch.int8"):
        FusedGeluMLP(quantize_weight(w1).data, b1, w2, b2, FP32)
    with pytest.raises(LaunchError, match=r"w2 must be a fp32 tensor for dtype fp32, got list"):
        FusedGeluMLP(w1, b1, w2.tolist(), b2, FP32)
    with pytest.raises(LaunchError, match=r"b1 must be a floating-point tensor or None, got float"):
        FusedGeluMLP(w1, 0.5, w2, b2, FP32)


# ---- 6. quantize_weight's group size ----------------------------------------------------------


@pytest.mark.parametrize("group_size", [0, -8, 2.5, True])
def test_quantize_weight_checks_group_size(group_size):
    w = torch.randn(F, D)
    with pytest.raises(SchemeError, match=rf"group_size must be a positive int or None, got {group_size!r}"):
        quantize_weight(w, group_size=group_size)
    with pytest.raises(SchemeError, match="group_size must be a positive int"):
        weight_scale(w, group_size)


def test_quantize_weight_takes_a_2d_float_weight():
    with pytest.raises(LaunchError, match=r"the weight to quantize must be a 2-D floating-point tensor, got a torch.float32 tensor of shape \(64,\)"):
        quantize_weight(torch.randn(F))
    assert quantize_weight(torch.randn(F, D), group_size=16).scale.shape == (F, 2)
