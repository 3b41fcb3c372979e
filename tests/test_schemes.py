"""The shared vocabulary: each spelling parses to one value and prints back the same way."""

import math

import pytest
import torch

from kernels.reference import eager_gelu, gelu
from kernels.schemes import ActivationScheme, Granularity, SchemeError, WeightLayout, closest_key, scheme_key


@pytest.mark.parametrize("text", ["per-channel", "group:128", "group:7"])
def test_granularity_round_trips(text):
    assert str(Granularity.parse(text)) == text


@pytest.mark.parametrize("text", ["dynamic", "static", "group:128", "group:64"])
def test_activation_scheme_round_trips(text):
    assert str(ActivationScheme.parse(text)) == text


@pytest.mark.parametrize("bad", ["group:0", "group:-1", "group:x", "group", "per-row", "", "group:²", "group:" + "9" * 5000])
def test_bad_granularity_is_one_clear_error(bad):
    with pytest.raises(SchemeError, match="granularity"):
        Granularity.parse(bad)


@pytest.mark.parametrize("bad", ["token", "group:0", "group:", "Dynamic", "group:²", "group:" + "9" * 5000])
def test_bad_activation_scheme_is_one_clear_error(bad):
    with pytest.raises(SchemeError, match="activations"):
        ActivationScheme.parse(bad)


def test_activation_schemes_map_to_compressed_tensors_strategies():
    assert [ActivationScheme.parse(s).strategy for s in ("dynamic", "group:128", "static")] == ["token", "group", "tensor"]
    assert [ActivationScheme.parse(s).is_dynamic for s in ("dynamic", "group:128", "static")] == [True, True, False]


def test_weight_layout_is_its_string():
    assert WeightLayout.parse("in_out") is WeightLayout.IN_OUT
    assert WeightLayout.IN_OUT == "in_out" and str(WeightLayout.OUT_IN) == "out_in"
    with pytest.raises(SchemeError, match="weight_layout"):
        WeightLayout.parse("nk")


def test_quick_gelu_is_x_sigmoid_1702x():
    x = torch.linspace(-6, 6, 101, dtype=torch.float64)
    expected = torch.tensor([v / (1 + math.exp(-1.702 * v)) for v in x.tolist()], dtype=torch.float64)
    assert torch.allclose(gelu(x, "quick"), expected, rtol=1e-12, atol=1e-12)
    assert torch.allclose(eager_gelu(x, "quick"), expected, rtol=1e-12, atol=1e-12)
    # and it is not the erf GELU (they differ by up to ~2e-2 near x = -2)
    assert (gelu(x, "quick") - gelu(x, "erf")).abs().max() > 1e-2


def test_scheme_keys_and_their_closest_measured_stand_in():
    assert [scheme_key("fp16"), scheme_key("w8a16", "group:128"), scheme_key("w8a16", None), scheme_key("w8a8", activations="group:64")] == [
        "fp16", "w8a16:group:128", "w8a16:per-channel", "w8a8:group:64",
    ]  # fmt: skip
    table = {"w8a16:per-channel": 1, "w8a16:group:128": 2, "w8a8:dynamic": 3, "w8a8:group:128": 4, "w8a8:static": 5}
    # a finer group than the table's stands in for it: at least as accurate
    assert [closest_key(k, table) for k in ("w8a8:static", "w8a8:group:32", "w8a16:group:64", "w8a16:group:256")] == [
        "w8a8:static", "w8a8:group:128", "w8a16:group:128", "w8a16:per-channel",
    ]  # fmt: skip
    with pytest.raises(KeyError):
        closest_key("w8a8:group:256", table)  # coarser than anything measured for w8a8
