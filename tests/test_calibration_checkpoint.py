"""calibration/checkpoint.py: finding the MLPs of each naming family, GELU flavour, bad files."""

import json

import pytest
import torch
from safetensors.torch import save_file

from calibration.checkpoint import all_finite, find_mlps, open_checkpoint, read_mlp, read_norm
from calibration.errors import CheckpointError, OptionError
from checkpoints import FAMILIES, checkpoint_tensors, corrupt_files, write_checkpoint

D_MODEL, D_FF = 16, 48


@pytest.mark.parametrize("family", list(FAMILIES))
def test_finds_every_mlp_of_each_family(tmp_path, family):
    spec = FAMILIES[family]
    n_layers = 1 if spec.block == "" else 3
    path = write_checkpoint(tmp_path / "model.safetensors", family, n_layers=n_layers, d_model=D_MODEL, d_ff=D_FF)
    layers = find_mlps(path)
    assert [layer.fc1 for layer in layers] == [spec.fc1_prefix(i) for i in range(n_layers)]
    assert [layer.fc2 for layer in layers] == [spec.fc2_prefix(i) for i in range(n_layers)]
    tensors = checkpoint_tensors(family, n_layers=n_layers, d_model=D_MODEL, d_ff=D_FF)
    for i, layer in enumerate(layers):
        assert (layer.d_model, layer.d_ff) == (D_MODEL, D_FF)
        assert layer.weight_layout == spec.weight_layout
        assert layer.gelu == spec.gelu and "default" in layer.gelu_source
        assert layer.norm == spec.norm_prefix(i)
        assert layer.dtype == "F32"
        with open_checkpoint(path) as ckpt:
            w1, b1, w2, b2, *_ = read_mlp(ckpt, layer)
            assert torch.equal(w1, tensors[layer.w1]) and torch.equal(w2, tensors[layer.w2])
            assert torch.equal(b1, tensors[layer.b1]) and torch.equal(b2, tensors[layer.b2])
            norm = read_norm(ckpt, layer)
            assert (norm is None) == (spec.norm is None)


def test_layers_come_in_numeric_order_and_without_second_bias(tmp_path):
    tensors = checkpoint_tensors("bert", n_layers=12, bias2=False)
    layers = find_mlps(write_checkpoint(tmp_path / "m.safetensors", tensors=tensors))
    assert [layer.fc1 for layer in layers] == [f"encoder.layer.{i}.intermediate.dense" for i in range(12)]
    assert all(layer.b2 is None and layer.b1 is not None for layer in layers)


def test_layers_regex_restricts(tmp_path):
    path = write_checkpoint(tmp_path / "m.safetensors", "bert", n_layers=4)
    chosen = find_mlps(path, layers=r"layer\.[13]\.")
    assert [layer.fc1 for layer in chosen] == ["encoder.layer.1.intermediate.dense", "encoder.layer.3.intermediate.dense"]
    assert [layer.fc1 for layer in find_mlps(path, layers="output.dense")] == [layer.fc1 for layer in find_mlps(path)]


def test_layers_regex_matching_nothing_names_what_exists(tmp_path):
    path = write_checkpoint(tmp_path / "m.safetensors", "bert", n_layers=2)
    with pytest.raises(CheckpointError, match=r"matches none of the 2 MLPs found: encoder\.layer\.0\.intermediate\.dense"):
        find_mlps(path, layers="decoder")
    with pytest.raises(OptionError, match="not a valid regular expression"):
        find_mlps(path, layers="layer[")


@pytest.mark.parametrize(
    "config,gelu",
    [
        ({"hidden_act": "gelu"}, "erf"),
        ({"hidden_act": "gelu_new"}, "tanh"),
        ({"hidden_act": "gelu_pytorch_tanh"}, "tanh"),
        ({"activation_function": "gelu_fast"}, "tanh"),
        ({"activation_function": "gelu"}, "erf"),
    ],
)
@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_config_json_decides_the_gelu(tmp_path, config, gelu, family):
    path = write_checkpoint(tmp_path / "m.safetensors", family, config=config)
    layers = find_mlps(path)
    assert {layer.gelu for layer in layers} == {gelu}
    assert "config.json" in layers[0].gelu_source


def test_asked_gelu_wins_over_config(tmp_path):
    path = write_checkpoint(tmp_path / "m.safetensors", "gpt2", config={"activation_function": "gelu_new"})
    assert {layer.gelu for layer in find_mlps(path, gelu="erf")} == {"erf"}
    with pytest.raises(OptionError, match="--gelu"):
        find_mlps(path, gelu="relu")


def test_non_gelu_config_is_refused(tmp_path):
    path = write_checkpoint(tmp_path / "m.safetensors", "vit", config={"hidden_act": "silu"})
    with pytest.raises(CheckpointError, match="hidden_act='silu'.*--gelu"):
        find_mlps(path)
    (tmp_path / "config.json").write_text('{"hidden_act": "quick_gelu"}')  # CLIP's: a GELU of its own
    assert {layer.gelu for layer in find_mlps(path)} == {"quick"}
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        find_mlps(path)


def test_no_mlp_found_says_what_was_tried_and_what_looked_close(tmp_path):
    tensors = {
        "model.layers.0.mlp.up_proj.weight": torch.randn(8, 4),
        "model.layers.0.mlp.down_proj.weight": torch.randn(4, 8),
        "model.embed_tokens.weight": torch.randn(10, 4),
    }
    path = write_checkpoint(tmp_path / "m.safetensors", tensors=tensors)
    with pytest.raises(CheckpointError) as exc:
        find_mlps(path)
    message = str(exc.value)
    for convention in ("intermediate.dense", "mlp.c_fc", "mlp.fc1", "mlp.dense_h_to_4h", "w1, b1, w2"):
        assert convention in message
    assert "model.layers.0.mlp.up_proj.weight" in message
    assert "embed_tokens" not in message


def test_gated_w1_w2_w3_is_not_a_plain_gelu_mlp(tmp_path):
    tensors = {"w1": torch.randn(8, 4), "b1": torch.randn(8), "w2": torch.randn(4, 8), "w3": torch.randn(8, 4)}
    with pytest.raises(CheckpointError, match="no GELU MLP found"):
        find_mlps(write_checkpoint(tmp_path / "m.safetensors", tensors=tensors))


@pytest.mark.parametrize(
    "name,shape,complaint",
    [
        ("encoder.layer.1.output.dense.weight", (16, 40), r"output\.dense\.weight has shape \[16, 40\], expected \[16, 48\]"),
        ("encoder.layer.1.intermediate.dense.bias", (47,), r"intermediate\.dense\.bias has shape \[47\], expected \[48\]"),
        ("encoder.layer.1.output.dense.bias", (48,), r"output\.dense\.bias has shape \[48\], expected \[16\]"),
        ("encoder.layer.1.attention.output.LayerNorm.weight", (15,), r"LayerNorm\.weight has shape \[15\]"),
        ("encoder.layer.1.intermediate.dense.weight", (48, 16, 1), "must be 2-D"),
    ],
)
def test_mismatched_shapes_are_refused(tmp_path, name, shape, complaint):
    tensors = checkpoint_tensors("bert", d_model=16, d_ff=48)
    tensors[name] = torch.randn(*shape)
    with pytest.raises(CheckpointError, match=complaint):
        find_mlps(write_checkpoint(tmp_path / "m.safetensors", tensors=tensors))


def test_half_an_mlp_is_refused(tmp_path):
    tensors = checkpoint_tensors("gpt2")
    del tensors["transformer.h.1.mlp.c_proj.weight"]
    with pytest.raises(CheckpointError, match=r"transformer\.h\.1\.mlp\.c_proj\.weight is missing"):
        find_mlps(write_checkpoint(tmp_path / "m.safetensors", tensors=tensors))


def test_integer_weights_are_refused(tmp_path):
    tensors = checkpoint_tensors("vit")
    tensors["blocks.0.mlp.fc1.weight"] = torch.ones(48, 16, dtype=torch.int8)
    with pytest.raises(CheckpointError, match="is I8; quantize takes float weights"):
        find_mlps(write_checkpoint(tmp_path / "m.safetensors", tensors=tensors))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_weights_are_refused_on_read(tmp_path, bad):
    tensors = checkpoint_tensors("bert")
    tensors["encoder.layer.1.output.dense.weight"][3, 5] = bad
    path = write_checkpoint(tmp_path / "m.safetensors", tensors=tensors)
    layer = find_mlps(path)[1]
    with open_checkpoint(path) as ckpt, pytest.raises(CheckpointError, match=r"output\.dense\.weight holds 1 NaN/Inf"):
        read_mlp(ckpt, layer)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_all_finite_sees_one_bad_value_anywhere(dtype, bad):
    w = torch.randn(33, 70).to(dtype)
    assert all_finite(w) and all_finite(w.t()) and all_finite(torch.zeros(0, 4, dtype=dtype))
    for where in [(0, 0), (17, 41), (32, 69)]:
        poisoned = w.clone()
        poisoned[where] = bad
        assert not all_finite(poisoned) and not all_finite(poisoned.t())


def test_bf16_and_fp16_checkpoints(tmp_path):
    for dtype, name in ((torch.bfloat16, "BF16"), (torch.float16, "F16")):
        path = write_checkpoint(tmp_path / f"{name}.safetensors", "bert", dtype=dtype)
        assert {layer.dtype for layer in find_mlps(path)} == {name}


def test_invalid_files_are_checkpoint_errors(tmp_path):
    for what, path in corrupt_files(tmp_path).items():
        with pytest.raises(CheckpointError, match="not a valid safetensors file"):
            find_mlps(path)
    with pytest.raises(CheckpointError, match="no such file"):
        find_mlps(tmp_path / "missing.safetensors")
    # A directory is a model directory: it must hold model.safetensors or an index.
    with pytest.raises(CheckpointError, match="a model directory holds model.safetensors or model.safetensors.index.json; it holds corrupt_header"):
        find_mlps(tmp_path)


def test_config_beside_the_checkpoint_is_the_one_read(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_act": "gelu_new"}))
    sub = tmp_path / "sub"
    sub.mkdir()
    path = sub / "m.safetensors"
    save_file(checkpoint_tensors("bert"), str(path))
    assert {layer.gelu for layer in find_mlps(path)} == {"erf"}


@pytest.mark.parametrize("shape", [(4, 1), (1, 4), (6, 3), (5, 9)])
def test_int8_packing_takes_transposed_weights_on_every_device(shape):
    # A Conv1D weight reaches the packer as a transposed view; on CUDA an elementwise
    # result keeps those strides, and a one-column weight's rows were not four bytes apart.
    from calibration.quantized_file import pack_int8, unpack_int8
    from conftest import DEVICE

    q = torch.randint(-128, 128, (shape[1], shape[0]), dtype=torch.int8, device=DEVICE).t()
    packed = pack_int8(q)
    n, k = shape
    assert packed.dtype == torch.int32 and packed.shape == (n, -(-k // 4))
    assert torch.equal(unpack_int8(packed, n, k), q)
    # compressed-tensors' layout: byte j of word w holds q[:, 4w + j] + 128, padding bytes 0
    expected = torch.zeros((n, packed.shape[1] * 4), dtype=torch.int64)
    expected[:, :k] = q.cpu().to(torch.int64) + 128
    words = (expected.reshape(n, -1, 4) << torch.tensor([0, 8, 16, 24])).sum(-1)
    assert torch.equal(packed.cpu().to(torch.int64) & 0xFFFFFFFF, words)
