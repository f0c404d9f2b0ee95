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


@pytest.mark.parametrize("name", ["sasrec", "gru4rec", "caser"])
def test_two_process_ddp_matches_one_process(tmp_path, name):
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
    ]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = torch.load(out, weights_only=False)
    assert ddp["world"] == 2

    config = train.TrainConfig(
        model=name, data="synthetic", epochs=2, batch_size=100, max_len=6, dropout=0.0, progress=False, seed=3
    )
    data = train.load_data(config, MODELS[name].padding_side)
    model = train.build_model(config, data.n_items, data.n_users)
    epochs, _ = train.fit(model, data, config, log=lambda _: None)
    single = torch.tensor([e.loss for e in epochs], dtype=torch.float64)
    torch.testing.assert_close(torch.tensor(ddp["losses"], dtype=torch.float64), single, rtol=1e-5, atol=0)
    for key, value in model.state_dict().items():
        other = ddp["state"][key]
        err = ((other - value).norm() / value.norm().clamp_min(1e-30)).item()
        assert err < 1e-4, f"{key}: relative difference {err:.2e}"
