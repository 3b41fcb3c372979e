"""Swapping fused MLPs into transformers models, by checkpoint prefix (calibration/model.py, calibration/hf.py).

A float32 FusedGeluMLP built from a model's own linears computes what those linears and
the GELU between them compute, so with every MLP swapped at its seam the model's output
must not move (to float32 summation-order noise, 1e-6), and putting the model's own
modules back must restore it bit for bit. Tiny random models of each family (tests/hf_models.py);
BLOOM (its MLP adds the residual itself) and BART (fc1, activation and fc2 sit in the
layer beside attention) cover the seams that need identities.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from calibration.checkpoint import find_mlps
from calibration.hf import load_model
from calibration.model import SwapError, find_seam, module_path, plan_swaps, swap_mlps
from conftest import TOL_SWAPPED_FP32, rel_err
from hf_models import build, tiny_model
from kernels.module import FusedGeluMLP
from kernels.op import MLPConfig

# kind -> (fc1 and fc2 module paths of layer 0, the module the fused MLP replaces, the
# modules that become identities, the model's GELU flavour)
SEAMS = {
    "bert": ("encoder.layer.0.intermediate.dense", "encoder.layer.0.output.dense",
             "encoder.layer.0.intermediate", ("encoder.layer.0.output.dense",), "erf"),
    "bert-head": ("bert.encoder.layer.0.intermediate.dense", "bert.encoder.layer.0.output.dense",
                  "bert.encoder.layer.0.intermediate", ("bert.encoder.layer.0.output.dense",), "erf"),
    "gpt2": ("transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj", "transformer.h.0.mlp", (), "tanh"),
    "gpt-neox": ("gpt_neox.layers.0.mlp.dense_h_to_4h", "gpt_neox.layers.0.mlp.dense_4h_to_h", "gpt_neox.layers.0.mlp", (), "erf"),
    "vit": ("layers.0.mlp.fc1", "layers.0.mlp.fc2", "layers.0.mlp", (), "erf"),
    "bloom": ("h.0.mlp.dense_h_to_4h", "h.0.mlp.dense_4h_to_h", "h.0.mlp.dense_h_to_4h",
              ("h.0.mlp.gelu_impl", "h.0.mlp.dense_4h_to_h"), "tanh"),
    "bart": ("encoder.layers.0.fc1", "encoder.layers.0.fc2", "encoder.layers.0.fc1",
             ("encoder.layers.0.activation_fn", "encoder.layers.0.fc2"), "erf"),
}  # fmt: skip


def float_mlp(fc1: nn.Module, fc2: nn.Module, gelu: str) -> FusedGeluMLP:
    """The model's own MLP as a float32 FusedGeluMLP: nn.Linear ([out, in]) or Conv1D ([in, out])."""
    layout = "out_in" if isinstance(fc1, nn.Linear) else "in_out"
    config = MLPConfig(dtype="fp32", gelu=gelu, weight_layout=layout, backend="torch")
    return FusedGeluMLP(fc1.weight, fc1.bias, fc2.weight, fc2.bias, config)


def every_layer(path: str, layers: int = 2) -> list[str]:
    """layer 0's module path and the same path in the model's other layers."""
    return [path.replace(".0.", f".{i}.", 1) for i in range(layers)]


def model_inputs(kind: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    if kind == "vit":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=generator)}
    ids = torch.randint(4, 40, (2, 7), generator=generator)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0  # padding on the second row
    return {"input_ids": ids, "attention_mask": mask}


@torch.inference_mode()
def output(model: nn.Module, kind: str) -> torch.Tensor:
    out = model(**model_inputs(kind))
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("kind", list(SEAMS))
def test_float_mlps_swapped_at_their_seams_leave_the_model_unchanged(kind):
    model = tiny_model(kind)
    fc1_path, fc2_path, seam, identities, gelu = SEAMS[kind]
    assert find_seam(model, fc1_path, fc2_path) == (seam, identities)
    before = output(model, kind)
    linears = {f"mlp{i}": (a, b, None) for i, (a, b) in enumerate(zip(every_layer(fc1_path), every_layer(fc2_path)))}
    if kind == "bart":  # the decoder's MLP too
        linears["decoder"] = ("decoder.layers.0.fc1", "decoder.layers.0.fc2", None)
    mlps = {name: float_mlp(model.get_submodule(a), model.get_submodule(b), gelu) for name, (a, b, _) in linears.items()}
    originals = {name: module for name, module in model.named_modules()}
    swaps = plan_swaps(model, mlps, linears=linears)
    with swaps.active():
        assert model.get_submodule(swaps.paths[0]) is mlps["mlp0"]
        assert all(isinstance(model.get_submodule(p), nn.Identity) for p in identities)
        swapped = output(model, kind)
    assert rel_err(swapped, before) < TOL_SWAPPED_FP32
    assert not torch.equal(swapped, before) or kind == "bart"  # the fused modules really ran (summation order differs)
    # The model's own modules are back, and compute exactly what they did.
    assert all(model.get_submodule(name) is module for name, module in originals.items() if name)
    assert torch.equal(output(model, kind), before)


@pytest.mark.parametrize("kind", ["bert", "bert-head", "gpt2", "gpt-neox", "vit"])
def test_checkpoint_prefixes_find_the_models_modules(kind, tmp_path):
    # The names quantize gives (the checkpoint's own) map to the modules of the class
    # transformers loads: BertModel for a checkpoint saved from BertForMaskedLM (`bert.`
    # dropped), GPT2LMHeadModel's `transformer.`, transformers 5's renamed ViT (by weights).
    model_dir = build(kind, tmp_path / kind)
    hf = load_model(model_dir, "cpu")
    layers = find_mlps(model_dir / "model.safetensors")
    assert [layer.fc1 for layer in hf.layers] == [layer.fc1 for layer in layers]
    fc1_path, fc2_path, seam, identities, _ = SEAMS[kind]
    if kind == "bert-head":  # loaded as a bare BertModel
        fc1_path, fc2_path, seam = (p.removeprefix("bert.") for p in (fc1_path, fc2_path, seam))
        identities = tuple(p.removeprefix("bert.") for p in identities)
    assert hf.linears[layers[1].fc1] == (every_layer(fc1_path)[1], every_layer(fc2_path)[1], None)
    mlps = {layer.fc1: float_mlp(*(hf.model.get_submodule(p) for p in hf.linears[layer.fc1][:2]), layer.gelu) for layer in layers}
    swaps = plan_swaps(hf.model, mlps, linears=hf.linears)
    assert [s.path for s in swaps.seams] == every_layer(seam) and swaps.seams[0].identities == identities


def test_swap_mlps_by_name_alone_adds_or_drops_the_base_model_prefix():
    model = tiny_model("bert-head")  # modules under `bert.`
    bare = tiny_model("bert")  # modules without it
    for target, prefix in ((model, "encoder.layer.1.intermediate.dense"), (bare, "bert.encoder.layer.1.intermediate.dense")):
        fc1 = module_path(target, prefix)
        assert fc1 == ("bert." if target is model else "") + "encoder.layer.1.intermediate.dense"
        output_dense = target.get_submodule(module_path(target, prefix.replace("intermediate", "output")))
        fused = float_mlp(target.get_submodule(fc1), output_dense, "erf")
        paths = swap_mlps(target, {prefix: fused})
        assert paths == [fc1.removesuffix(".dense")]
        assert target.get_submodule(paths[0]) is fused


def test_swap_errors_replace_nothing():
    model = tiny_model("gpt2")
    originals = [block.mlp for block in model.transformer.h]
    good = float_mlp(model.transformer.h[0].mlp.c_fc, model.transformer.h[0].mlp.c_proj, "tanh")
    other = tiny_model("bert")
    wrong_size = FusedGeluMLP(torch.randn(5, 32), None, torch.randn(32, 5), None, MLPConfig(dtype="fp32"))
    cases = [
        ({"transformer.h.0.mlp.c_fc": good, "transformer.h.7.mlp.c_fc": good}, "names no module"),
        ({"transformer.h.0.mlp.c_fc": good, "transformer.h.1.mlp.c_fc": wrong_size}, "d_model=32, d_ff=80 but the new MLP is d_model=32, d_ff=5"),
        ({"transformer.h.0.mlp.c_fc": good, "transformer.h.1.attn.c_attn": good}, "not an MLP prefix"),
        ({"transformer.h.0.mlp.c_fc": good, "h.0.mlp.c_fc": good}, "two MLPs map to the same module"),
    ]
    for mlps, message in cases:
        with pytest.raises(SwapError, match=message):
            swap_mlps(model, mlps)
        assert [block.mlp for block in model.transformer.h] == originals
    with pytest.raises(SwapError, match="does not have"):
        swap_mlps(other, {"x": good}, find={"x": "encoder.layer.9.intermediate"})


def test_swap_with_an_explicit_mapping_replaces_that_module_whole():
    model = tiny_model("gpt-neox")
    mlp = model.gpt_neox.layers[1].mlp
    fused = float_mlp(mlp.dense_h_to_4h, mlp.dense_4h_to_h, "erf")
    assert swap_mlps(model, {"blocks.1.ffn": fused}, find={"blocks.1.ffn": "gpt_neox.layers.1.mlp"}) == ["gpt_neox.layers.1.mlp"]
    assert model.gpt_neox.layers[1].mlp is fused
