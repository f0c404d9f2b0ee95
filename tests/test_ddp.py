"""Multi-process data parallel training (torchrun, gloo on CPU) against one process.

Two processes each take half of every global batch; their loss shares are weighted so that the
averaged gradients equal one process's over the whole global batch. After two epochs the logged
losses and the final parameters agree with a single-process run within the fp32 bound of a
different summation order (relative 1e-5 on losses, 1e-4 on parameters after 2 epochs of Adam).
Dropout is 0 (each process would draw its own masks)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastrec import train
from fastrec.models import MODELS

WORKER = Path(__file__).with_name("ddp_worker.py")


def _ddp_matches_one_process(
    tmp_path, name: str, backend: str = "fastrec", batch_size: int = 100, key_bias_is_noise: bool = False
) -> None:
    """Train with two gloo processes (tests/ddp_worker.py) and in this one from the same seed; the
    logged epoch losses and the final weights agree (module docstring). ``key_bias_is_noise``:
    attention's key bias (the middle third of ``in_proj_bias``) is held to an absolute bound
    instead: softmax ignores a bias added to every key, so its gradient is zero but for rounding
    and its Adam steps are rounding noise, which differs between any two summation orders."""
    out = tmp_path / "ddp.pt"
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(WORKER),
        name,
        str(out),
        backend,
        str(batch_size),
    ]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = torch.load(out, weights_only=False)
    assert ddp["world"] == 2

    config = train.TrainConfig(
        model=name,
        data="synthetic",
        backend=backend,
        epochs=2,
        batch_size=batch_size,
        max_len=6,
        dropout=0.0,
        progress=False,
        seed=3,
    )
    data = train.load_data(config, MODELS[name].padding_side)
    model = train.build_model(config, data.n_items, data.n_users)
    epochs, _ = train.fit(model, data, config, log=lambda _: None)
    single = torch.tensor([e.loss for e in epochs], dtype=torch.float64)
    torch.testing.assert_close(torch.tensor(ddp["losses"], dtype=torch.float64), single, rtol=1e-5, atol=0)
    for key, value in model.state_dict().items():
        other = ddp["state"][key]
        if key_bias_is_noise and key.endswith("self_attn.in_proj_bias"):
            q, k, v = value.chunk(3)
            other_q, other_k, other_v = other.chunk(3)
            assert (other_k - k).abs().max() < 1e-4 and k.abs().max() < 1e-4, key
            value, other = torch.cat([q, v]), torch.cat([other_q, other_v])
        err = ((other - value).norm() / value.norm().clamp_min(1e-30)).item()
        assert err < 1e-4, f"{key}: relative difference {err:.2e}"


@pytest.mark.parametrize("name", ["sasrec", "gru4rec", "caser"])
def test_two_process_ddp_matches_one_process(tmp_path, name):
    _ddp_matches_one_process(tmp_path, name)


@pytest.mark.parametrize("name, backend", [("sasrec", "torch"), ("sasrec", "fastrec"), ("gru4rec", "fastrec")])
def test_uneven_shards_an_empty_one_contributes_nothing(tmp_path, name, backend):
    """Batch size 371 over the 1114 training examples: the last batch has one row, so the second
    process's share is empty; the losses stay finite and equal one process's run."""
    _ddp_matches_one_process(tmp_path, name, backend, batch_size=371, key_bias_is_noise=True)
