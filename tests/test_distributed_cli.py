"""Layer-sharded quantize and verify under torchrun: two CPU processes (gloo), against one process.

`torchrun --nproc-per-node 2 -m gelugemm_cli verify|quantize ...` must give what the plain
command gives: verify's per-row errors within 1e-6 relative (timings, memory and device fields
aside), quantize's output directory tensor for tensor, with one report from rank 0.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from checkpoints import checkpoint_tensors, write_sharded

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: list, *, ranks: int | None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GELUGEMM_AUTOTUNE": "0", "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)  # CPU: the torch backend, as a user's run
    launcher = [sys.executable, "-m", "gelugemm_cli"]
    if ranks is not None:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
                    "--master-port", str(free_port()), "-m", "gelugemm_cli"]  # fmt: skip
    return subprocess.run([*launcher, *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("dist")
    tensors = checkpoint_tensors("bert", n_layers=5, d_model=16, d_ff=48)
    return write_sharded(tmp / "model", tensors, 3, config={"model_type": "bert", "hidden_act": "gelu"})


def rows(report: dict) -> dict:
    return {(r["layer"], r["dtype"]): r for r in report["rows"]}


def test_distributed_verify_equals_one_process(model, tmp_path):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    single = run(["verify", model, "--dtype", "all", "--json", one], ranks=None)
    split = run(["verify", model, "--dtype", "all", "--json", two], ranks=2)
    assert single.returncode == split.returncode == 0, split.stderr[-2000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert rows(a).keys() == rows(b).keys() and len(a["layers"]) == len(b["layers"]) == 5
    for key, row in rows(a).items():
        for ref in ("vs_fp16_path", "vs_float64"):
            for metric, value in row[ref].items():
                other = rows(b)[key][ref][metric]
                assert other == pytest.approx(value, rel=1e-6, abs=1e-12), (key, ref, metric)
    assert split.stdout.count("PASS: all") == 1  # one report, from rank 0


def test_distributed_quantize_writes_what_one_process_writes(model, tmp_path):
    for ranks, out in ((None, tmp_path / "one"), (2, tmp_path / "two")):
        done = run(["quantize", model, "--scheme", "w8a8", "--activations", "static", "--calib", "synthetic", "--tokens", "64", "-o", out], ranks=ranks)
        assert done.returncode == 0, done.stderr[-2000:]
    one, two = tmp_path / "one", tmp_path / "two"
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())
    for shard in one.glob("*.safetensors"):
        a, b = load_file(str(shard)), load_file(str(two / shard.name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), shard.name
    index = lambda d: json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]  # noqa: E731
    assert index(one) == index(two)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
