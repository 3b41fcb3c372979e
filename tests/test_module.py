"""kernels/module.py: the op as an nn.Module, loaded from a quantized file, swapped into a model.

The module must hand the op exactly the weights, scales and config it holds: on the torch
backend its output equals the reference MLP's bit for bit (input cast to the op's dtype,
output cast back). Loading reads a file quantize wrote; swapping puts modules into the tiny
random transformers BERT; `.to()` moves every buffer and keeps every dtype.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from calibration.hf import load_model
from calibration.checkpoint import find_mlps
from calibration.errors import CheckpointError
from calibration.options import QuantizeOptions
from calibration.quantize import quantize_checkpoint
from calibration.quantize_mlp import quantize_mlp
from calibration.quantized_file import load_quantized_mlp
from checkpoints import write_checkpoint
from conftest import DEVICE, TOL_QUANTIZED_VS_FLOAT, TOL_VS_FLOAT64, TOL_VS_REFERENCE, rel_err
from kernels.errors import GelugemmError
from calibration.model import load_mlp, load_mlps, swap_mlps
from kernels.module import FusedGeluMLP
from kernels.op import FLOAT_DTYPES, MLPConfig
from kernels.quantized import QuantizedWeight
from kernels.reference import mlp_reference, w8a8_mlp_reference, w8a16_mlp_reference
from hf_models import build

D_MODEL, D_FF = 32, 80


def float_weights(layout: str, d: int = D_MODEL, f: int = D_FF) -> tuple[torch.Tensor, ...]:
    """(w1, b1, w2, b2) float32 in `layout`."""
    w1 = torch.randn(f, d) / math.sqrt(d)
    w2 = torch.randn(d, f) / math.sqrt(f)
    if layout == "in_out":
        w1, w2 = w1.t().contiguous(), w2.t().contiguous()
    return w1, 0.5 * torch.randn(f), w2, 0.5 * torch.randn(d)


# ---- the module computes what the reference computes ---------------------------------------


@pytest.mark.parametrize("layout,gelu", [("out_in", "erf"), ("in_out", "tanh")])
@pytest.mark.parametrize("dtype", list(FLOAT_DTYPES))
def test_float_module_is_the_reference_mlp(dtype, layout, gelu):
    w1, b1, w2, b2 = float_weights(layout)
    module = FusedGeluMLP(w1, b1, w2, b2, MLPConfig(dtype=dtype, gelu=gelu, weight_layout=layout, backend="torch"))
    x = torch.randn(2, 5, D_MODEL) * 2
    y = module(x)
    assert y.shape == x.shape and y.dtype == torch.float32  # the caller's dtype back
    t = FLOAT_DTYPES[dtype]
    cast = lambda v: v.to(t)  # noqa: E731
    ref = mlp_reference(cast(x), cast(w1), cast(b1), cast(w2), cast(b2), gelu_flavour=gelu, weight_layout=layout)
    assert torch.equal(y, ref.float())
    exact = mlp_reference(x.double(), *(v.double() for v in (w1, b1, w2, b2)), gelu_flavour=gelu, weight_layout=layout)
    assert rel_err(y, exact) < TOL_VS_FLOAT64[t]


INT8_VARIANTS = [
    ("w8a16", dict(), "dynamic"),
    ("w8a16", dict(group_size=16), "dynamic"),
    ("w8a8", dict(activations="static"), "static"),
    ("w8a8", dict(), "dynamic"),
    ("w8a8", dict(), "group:32"),
    ("w8a8", dict(activations="static", smooth=0.5), "static"),
]


@pytest.mark.parametrize("layout,gelu", [("out_in", "erf"), ("in_out", "tanh")])
@pytest.mark.parametrize("scheme,options,activations", INT8_VARIANTS, ids=["w8a16", "w8a16-group16", "w8a8-static", "w8a8-dynamic", "w8a8-group32", "w8a8-smooth"])
@pytest.mark.parametrize("act", ["fp16", "bf16"])
def test_int8_module_is_the_reference_mlp(scheme, options, activations, layout, gelu, act):
    w1, b1, w2, b2 = float_weights(layout)
    x = torch.randn(3, 7, D_MODEL) * 2
    q1, q2 = quantize_mlp(w1, b1, w2, x.reshape(-1, D_MODEL), scheme=scheme, weight_layout=layout, gelu=gelu, **options)
    config = MLPConfig(dtype=scheme, gelu=gelu, weight_layout=layout, backend="torch", activation_dtype=act, activations=activations)
    module = FusedGeluMLP(q1, b1, q2, b2, config)
    y = module(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    xa = x.to(config.torch_dtype)
    if scheme == "w8a16":
        ref = w8a16_mlp_reference(xa, q1, b1, q2, b2, gelu_flavour=gelu, weight_layout=layout)
    else:
        ref = w8a8_mlp_reference(xa, q1, b1, q2, b2, gelu_flavour=gelu, weight_layout=layout, activations=activations)
    assert torch.equal(y, ref.float())
    float_y = mlp_reference(x.double(), *(v.double() for v in (w1, b1, w2, b2)), gelu_flavour=gelu, weight_layout=layout)
    assert rel_err(y, float_y) < TOL_QUANTIZED_VS_FLOAT[scheme]


@pytest.mark.parametrize("scheme,activations", [("w8a16", "dynamic"), ("w8a8", "static")])
def test_a_quantized_module_checks_its_weights_once_not_every_forward(monkeypatch, scheme, activations):
    # The module hands the op QuantizedWeights rebuilt from its buffers on every forward; the
    # op's operand checks (a quarter of a small forward's host time) must still run once for
    # the same buffers, and again when a buffer is replaced.
    w1, b1, w2, b2 = float_weights("out_in")
    x = torch.randn(5, D_MODEL)
    options = dict(activations="static") if activations == "static" else {}
    q1, q2 = quantize_mlp(w1, b1, w2, x, scheme=scheme, **options)
    config = MLPConfig(dtype=scheme, backend="torch", activations=activations)
    module = FusedGeluMLP(q1, b1, q2, b2, config)
    checks = []
    real = module.op._check_int8
    monkeypatch.setattr(module.op, "_check_int8", lambda *a: checks.append(1) or real(*a))
    first = module(x)
    for _ in range(3):
        assert torch.equal(module(x), first)
    assert len(checks) == 1
    assert module.weights()[2] is module.weights()[2]  # built once, not every forward
    module.w2_scale = module.w2_scale * 2  # another tensor: checked again, and used
    assert module.weights()[2].scale is module.w2_scale
    assert not torch.equal(module(x), first) and len(checks) == 2


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_from_linears_runs_the_models_own_mlp(approximate):
    fc1, act, fc2 = nn.Linear(D_MODEL, D_FF), nn.GELU(approximate=approximate), nn.Linear(D_FF, D_MODEL)
    x = torch.randn(4, 3, D_MODEL)
    module = FusedGeluMLP.from_linears(fc1, fc2, act, backend="torch")
    assert module.config.dtype == "fp32" and module.config.gelu == {"none": "erf", "tanh": "tanh"}[approximate]
    with torch.no_grad():
        assert rel_err(module(x), fc2(act(fc1(x)))) < TOL_VS_REFERENCE[torch.float32]
    # Asked for fp16: the fp16 path, whatever the linears are.
    half = FusedGeluMLP.from_linears(fc1, fc2, act, dtype="fp16", backend="torch")
    assert half.w1.dtype == half.b1.dtype == torch.float16 and half(x).dtype == torch.float32


def test_mismatched_weights_and_config_are_refused():
    w1, b1, w2, b2 = float_weights("out_in")
    q1, q2 = quantize_mlp(w1, b1, w2, scheme="w8a16")
    with pytest.raises(GelugemmError, match="QuantizedWeight"):
        FusedGeluMLP(w1, b1, w2, b2, MLPConfig(dtype="w8a16"))
    with pytest.raises(GelugemmError, match="fp16 tensor"):
        FusedGeluMLP(q1, b1, q2, b2, MLPConfig(dtype="fp16"))


def test_w8a8_intermediate_scales_must_agree():
    w1, b1, w2, b2 = float_weights("out_in")
    q1, q2 = quantize_mlp(w1, b1, w2, torch.randn(64, D_MODEL), scheme="w8a8", activations="static")
    q2.input_scale = q1.output_scale * 2
    with pytest.raises(GelugemmError, match="input_scale differs"):
        FusedGeluMLP(q1, b1, q2, b2, MLPConfig(dtype="w8a8", activations="static"))


# ---- .to() moves everything, casts nothing -----------------------------------------------


def w8a8_module(backend: str = "auto") -> tuple[FusedGeluMLP, torch.Tensor]:
    w1, b1, w2, b2 = float_weights("out_in")
    x = torch.randn(40, D_MODEL)
    q1, q2 = quantize_mlp(w1, b1, w2, x, scheme="w8a8", smooth=0.5, activations="static")
    return FusedGeluMLP(q1, b1, q2, b2, MLPConfig(dtype="w8a8", activations="static", backend=backend)), x


def test_to_moves_every_buffer_and_keeps_every_dtype():
    module, x = w8a8_module()
    dtypes = {name: b.dtype for name, b in module.named_buffers()}
    assert {"w1", "w1_scale", "w1_input_scale", "w1_output_scale", "w1_smooth_scale", "w2", "w2_scale", "b1", "b2"} <= dtypes.keys()
    y = module(x)
    # A model cast as a whole (.half(), .double()) leaves the MLP's int8 data and float32
    # scales as they are, and its result unchanged.
    for cast in (lambda m: m.half(), lambda m: m.to(torch.float64), lambda m: m.float()):
        cast(module)
        assert {name: b.dtype for name, b in module.named_buffers()} == dtypes
        assert torch.equal(module(x), y)
    # The meta device stands in for another device here: every buffer moves, the op follows.
    module.to("meta")
    assert all(b.device.type == "meta" for b in module.buffers())
    assert module.op.device.type == "meta" and module.backend == "torch"
    w1, _, w2, _, w_up, _ = module.weights()
    assert w_up is None
    assert all(t.device.type == "meta" for t in (w1.data, w1.scale, w1.input_scale, w1.output_scale, w1.smooth_scale))
    assert w2.input_scale is w1.output_scale and w2.data.device.type == "meta"
    assert module(x.to("meta")).shape == x.shape


@pytest.mark.gpu
def test_to_cuda_runs_the_triton_kernels():
    module, x = w8a8_module(backend="auto")
    y_cpu = module(x)
    assert module.backend == "torch"
    module.to("cuda")
    assert module.backend == "triton" and all(b.is_cuda for b in module.buffers())
    y = module(x.cuda())
    assert y.is_cuda and rel_err(y, y_cpu) < TOL_VS_REFERENCE[torch.float16]


# ---- loading a quantized checkpoint ------------------------------------------------------


def quantized_file(tmp_path, family: str, scheme: str, **options):
    source = write_checkpoint(tmp_path / "model.safetensors", family, d_model=D_MODEL, d_ff=D_FF)
    output = tmp_path / f"model.{scheme}.safetensors"
    quantize_checkpoint(source, output, QuantizeOptions(scheme=scheme, **options))
    return source, output


@pytest.mark.parametrize("scheme,activations", [("w8a16", None), ("w8a8", "dynamic"), ("w8a8", "group:32"), ("w8a8", "static")])
@pytest.mark.parametrize("family", ["bert", "gpt2"])  # out_in and erf; in_out (Conv1D) and tanh
def test_load_mlps_from_a_quantized_file(tmp_path, family, scheme, activations):
    # the op runs each MLP with the activation scheme the file records
    options = dict(activations=activations) if scheme == "w8a8" else {}
    if activations == "static":
        options.update(calib="synthetic")
    source, path = quantized_file(tmp_path, family, scheme, **options)
    layers = find_mlps(source)
    mlps = load_mlps(path, backend="torch")
    assert list(mlps) == [layer.fc1 for layer in layers]
    for layer in layers:
        module = mlps[layer.fc1]
        cfg = module.config
        assert (cfg.dtype, cfg.gelu, cfg.weight_layout) == (scheme, layer.gelu, layer.weight_layout)
        if scheme == "w8a8":
            assert str(cfg.activations) == activations
        assert (module.d_model, module.d_ff) == (D_MODEL, D_FF)
        # the file's int8 weights and scales, run as the reference runs them
        w1, b1, w2, b2, *_ = load_quantized_mlp(path, layer)
        x = torch.randn(9, D_MODEL) * 2
        if scheme == "w8a16":
            ref = w8a16_mlp_reference(x.half(), w1, b1, w2, b2, gelu_flavour=layer.gelu, weight_layout=layer.weight_layout)
        else:
            ref = w8a8_mlp_reference(
                x.half(), w1, b1, w2, b2, gelu_flavour=layer.gelu, weight_layout=layer.weight_layout, activations=activations
            )
        assert torch.equal(module(x), ref.float())
        one = load_mlp(path, layer.fc1, backend="torch")
        assert all(torch.equal(a, b) for a, b in zip(one.state_dict().values(), module.state_dict().values()))


def test_load_errors_name_what_is_there(tmp_path):
    source, path = quantized_file(tmp_path, "bert", "w8a16")
    with pytest.raises(CheckpointError, match="encoder.layer.0.intermediate.dense"):
        load_mlp(path, "encoder.layer.7.intermediate.dense")
    with pytest.raises(CheckpointError, match="not written by gelugemm quantize"):
        load_mlps(source)


# ---- swapping into a model (more families and seams: test_hf_swap.py) ------------------------


@pytest.fixture
def tiny_bert(tmp_path):
    """(model, its checkpoint path): a tiny random transformers BertModel saved as all-MiniLM-L6-v2 is."""
    model_dir = build("bert", tmp_path / "bert")
    return load_model(model_dir, "cpu").model, model_dir / "model.safetensors"


def hidden_states(model) -> torch.Tensor:
    ids = torch.tensor([[2, 7, 11, 5, 3, 0, 0], [2, 9, 30, 41, 17, 12, 3]])
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state


def bert_key(i: int) -> str:
    return f"encoder.layer.{i}.intermediate.dense"


def test_swapped_float_mlps_leave_the_model_unchanged(tiny_bert):
    model, _ = tiny_bert
    before = hidden_states(model)
    layers = model.encoder.layer
    mlps = {bert_key(i): FusedGeluMLP.from_linears(layer.intermediate.dense, layer.output.dense) for i, layer in enumerate(layers)}
    assert swap_mlps(model, mlps) == ["encoder.layer.0.intermediate", "encoder.layer.1.intermediate"]
    assert all(layers[i].intermediate is mlps[bert_key(i)] for i in range(2))
    assert rel_err(hidden_states(model), before) < TOL_VS_REFERENCE[torch.float32]


@pytest.mark.parametrize("scheme", ["w8a16", "w8a8"])
def test_swapped_quantized_mlps_run_in_the_model(tiny_bert, tmp_path, scheme):
    model, source = tiny_bert
    before = hidden_states(model)
    path = tmp_path / "model.int8.safetensors"
    quantize_checkpoint(source, path, QuantizeOptions(scheme=scheme))
    replaced = swap_mlps(model, load_mlps(path))
    assert replaced == ["encoder.layer.0.intermediate", "encoder.layer.1.intermediate"]
    assert all(isinstance(layer.intermediate, FusedGeluMLP) and layer.intermediate.config.dtype == scheme for layer in model.encoder.layer)
    after = hidden_states(model)
    assert after.dtype == torch.float32 and torch.isfinite(after).all()
    # The quantized MLPs are the model's own MLPs (accuracy on a real model: test_minilm_e2e.py).
    assert rel_err(after, before) < TOL_QUANTIZED_VS_FLOAT[scheme]


def test_load_and_swap_keep_quantized_weights_as_buffers(tiny_bert, tmp_path):
    # The whole model's state_dict carries the int8 weights and scales under the MLP's path.
    model, source = tiny_bert
    path = tmp_path / "model.int8.safetensors"
    quantize_checkpoint(source, path, QuantizeOptions(scheme="w8a8"))
    swap_mlps(model, load_mlps(path))
    state = model.state_dict()
    assert state["encoder.layer.0.intermediate.w1"].dtype == torch.int8
    assert state["encoder.layer.0.intermediate.w1_scale"].dtype == torch.float32
    assert isinstance(model.encoder.layer[0].intermediate.weights()[0], QuantizedWeight)
    assert not any(name.startswith("encoder.layer.0.intermediate.") for name, _ in model.named_parameters())
    model.to(DEVICE)
    assert all(b.device.type == DEVICE.type for b in model.encoder.layer[0].intermediate.buffers())
