"""Tensor parallelism (kernels/parallel.py, calibration/parallel.py) on CPU: two processes, gloo.

Each test spawns two ranks that build the same random MLP (same seed), split it, run the
tensor-parallel module and compare it with the whole MLP in one process; each rank writes
its verdict to a file the test reads. The op runs its torch backend on CPU.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from calibration.checkpoint import find_mlps, open_checkpoint, read_mlp
from calibration.parallel import load_tp_mlp, read_mlp_shard
from calibration.verify import torch_mlp
from checkpoints import write_checkpoint
from conftest import TOL_VS_REFERENCE, rel_err
from kernels.int8 import quantize_weight
from kernels.module import FusedGeluMLP
from kernels.op import FLOAT_DTYPES, MLPConfig
from kernels.parallel import ShardError, TensorParallelMLP, shard_bounds, shard_mlp_weights, tensor_parallel_in_one_process

WORLD = 2
D_MODEL, D_FF = 32, 256


def test_shard_bounds_cover_d_ff_on_aligned_edges():
    assert [shard_bounds(1024, 4, r) for r in range(4)] == [(0, 256), (256, 512), (512, 768), (768, 1024)]
    # 5 blocks of 128 over 2 ranks: 3 + 2, the last slice ends at d_ff
    assert [shard_bounds(600, 2, r) for r in range(2)] == [(0, 384), (384, 600)]
    # too small to align: contiguous element slices
    assert [shard_bounds(7, 2, r) for r in range(2)] == [(0, 4), (4, 7)]
    with pytest.raises(ShardError):
        shard_bounds(1, 2, 0)


def _weights(layout: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(D_FF, D_MODEL, generator=g) / math.sqrt(D_MODEL)
    w2 = torch.randn(D_MODEL, D_FF, generator=g) / math.sqrt(D_FF)
    if layout == "in_out":
        w1, w2 = w1.t().contiguous(), w2.t().contiguous()
    return w1, 0.5 * torch.randn(D_FF, generator=g), w2, 0.5 * torch.randn(D_MODEL, generator=g)


CASES = {
    "fp32-out_in-erf": dict(dtype="fp32", layout="out_in", gelu="erf"),
    "fp16-in_out-tanh": dict(dtype="fp16", layout="in_out", gelu="tanh"),
    "w8a16-group16": dict(dtype="w8a16", layout="out_in", gelu="erf", group=16),
    "w8a16-in_out": dict(dtype="w8a16", layout="in_out", gelu="quick"),
    "w8a8-dynamic": dict(dtype="w8a8", layout="out_in", gelu="erf"),
}


def _build(case: dict):
    """(full module, its weights, config) of one case; int8 weights quantized whole, then split."""
    w1, b1, w2, b2 = _weights(case["layout"])
    config = MLPConfig(dtype=case["dtype"], gelu=case["gelu"], weight_layout=case["layout"], backend="torch")
    if case["dtype"] in FLOAT_DTYPES:
        return (w1, b1, w2, b2), config
    q = lambda w: quantize_weight(w, weight_layout=case["layout"], group_size=case.get("group"))  # noqa: E731
    q1, q2 = q(w1), q(w2)
    if case["dtype"] == "w8a8":
        x_cal = torch.randn(64, D_MODEL)
        q1.output_scale = (torch.nn.functional.gelu(x_cal @ q1.dequantize(case["layout"]).t() + b1).abs().amax() / 127).reshape(())
    return (q1, b1, q2, b2), config


def _rank_main(rank: int, store: str, out_dir: str, checkpoint: str):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    torch.manual_seed(1)
    verdicts = {}
    x = torch.randn(3, 5, D_MODEL)  # the same on both ranks (same seed)
    for name, case in CASES.items():
        (w1, b1, w2, b2), config = _build(case)
        full = FusedGeluMLP(w1, b1, w2, b2, config)(x)
        shard = shard_mlp_weights(w1, b1, w2, case["layout"], rank, WORLD)
        y = TensorParallelMLP(FusedGeluMLP(*shard, None, config), b2)(x)
        exact = FusedGeluMLP(*(_weights(case["layout"])), MLPConfig(dtype="fp32", gelu=case["gelu"],
                             weight_layout=case["layout"], backend="torch"))(x.double().float())  # fmt: skip
        in_one_process = tensor_parallel_in_one_process(w1, b1, w2, b2, config, x, WORLD)
        verdicts[name] = {"vs_single": rel_err(y, full), "vs_fp32": rel_err(y, exact), "single_vs_fp32": rel_err(full, exact),
                          "same_as_in_one_process": torch.equal(y, in_one_process)}  # fmt: skip
    # from a checkpoint: each rank reads its slice
    tp = load_tp_mlp(checkpoint, "encoder.layer.1.intermediate.dense", MLPConfig(dtype="fp32", backend="torch"),
                     rank=rank, world=WORLD)  # fmt: skip
    verdicts["checkpoint"] = {"y": tp(x).tolist()}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(verdicts))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def tp_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tp")
    ckpt = write_checkpoint(tmp / "model.safetensors", "bert", d_model=D_MODEL, d_ff=D_FF, n_layers=2)
    mp.spawn(_rank_main, args=(str(tmp / "store"), str(tmp), str(ckpt)), nprocs=WORLD, join=True)
    return ckpt, [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.parametrize("name", list(CASES))
def test_tensor_parallel_equals_one_process(tp_run, name):
    _, ranks = tp_run
    case = CASES[name]
    for verdict in (r[name] for r in ranks):
        # two fp16 partials add to the same number in either order: the one-process simulation is exact
        assert verdict["same_as_in_one_process"]
        if case["dtype"] in FLOAT_DTYPES:
            # the same products, summed in another order (two partial sums, then the all-reduce)
            assert verdict["vs_single"] < TOL_VS_REFERENCE[FLOAT_DTYPES[case["dtype"]]]
        elif case["dtype"] == "w8a16":
            assert verdict["vs_single"] < 1e-3  # the same int8 weights and scales; fp16 rounding of two partials
        else:
            # dynamic w8a8: each rank scales its half of the GELU output by its own row absmax, a finer
            # grid than one process's: no worse against fp32 than one process (within noise)
            assert verdict["vs_fp32"] < 1.2 * verdict["single_vs_fp32"] + 1e-3


def test_each_rank_reads_its_slice_from_a_checkpoint(tp_run):
    ckpt, ranks = tp_run
    y0, y1 = (torch.tensor(r["checkpoint"]["y"]) for r in ranks)
    assert torch.equal(y0, y1)
    layer = next(m for m in find_mlps(ckpt) if m.fc1 == "encoder.layer.1.intermediate.dense")
    with open_checkpoint(ckpt) as handle:
        w1, b1, w2, b2, *_ = read_mlp(handle, layer)
        w1_0, b1_0, w2_0, b2_0, *_ = read_mlp_shard(handle, layer, 0, WORLD)
    assert torch.equal(w1_0, w1[:128]) and torch.equal(w2_0, w2[:, :128]) and torch.equal(b1_0, b1[:128])
    torch.manual_seed(1)
    x = torch.randn(3, 5, D_MODEL)
    full = FusedGeluMLP(w1, b1, w2, b2, MLPConfig(dtype="fp32", backend="torch"))(x)
    assert rel_err(y0, full) < TOL_VS_REFERENCE[torch.float32]


def test_shard_needs_b2_outside():
    (w1, b1, w2, b2), config = _build(CASES["fp32-out_in-erf"])
    with pytest.raises(ShardError, match="without b2"):
        TensorParallelMLP(FusedGeluMLP(w1, b1, w2, b2, config), b2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_w8a8_dynamic_split_is_no_less_accurate_than_one_gpu(seed):
    """Under w8a8 dynamic each rank quantizes its half of the GELU output with its own row
    scales: TP computes something else than one GPU, and users rely on it being no worse.
    Outliers in x's channels and in a few of W1's rows make some GELU columns large, as in
    real models, so one row scale over all of d_ff is coarse for the other columns."""
    g = torch.Generator().manual_seed(seed)
    d_model, d_ff, tokens = 64, 512, 48
    x = torch.randn(tokens, d_model, generator=g)
    x[:, torch.randperm(d_model, generator=g)[:3]] *= 20  # outlier channels
    w1 = torch.randn(d_ff, d_model, generator=g) / math.sqrt(d_model)
    w1[torch.randperm(d_ff, generator=g)[:4]] *= 8  # a few GELU columns far larger than the rest
    w2 = torch.randn(d_model, d_ff, generator=g) / math.sqrt(d_ff)
    b1, b2 = 0.5 * torch.randn(d_ff, generator=g), 0.5 * torch.randn(d_model, generator=g)
    config = MLPConfig(dtype="w8a8", activations="dynamic", backend="torch")
    q1, q2 = quantize_weight(w1), quantize_weight(w2)
    x16 = x.half()
    fp16_path = torch_mlp(x, w1, b1, w2, b2, gelu="erf", weight_layout="out_in", dtype=torch.float16)
    one_gpu = FusedGeluMLP(q1, b1, q2, b2, config)(x16)
    tp = tensor_parallel_in_one_process(q1, b1, q2, b2, config, x16, WORLD)
    assert rel_err(tp, one_gpu) > 1e-3  # the split does change the result (per-rank scales)
    assert rel_err(tp, fp16_path) <= 1.1 * rel_err(one_gpu, fp16_path)
