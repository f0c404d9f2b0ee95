"""Worker for tests/test_ddp.py, run by torchrun: trains a small model with fastrec.train.fit
(data parallel over the processes) and has rank 0 save the epoch losses and final weights.
Arguments: model, output path, and optionally the backend and the batch size."""

import sys

import torch
import torch.distributed as dist

from fastrec import train
from fastrec.models import MODELS


def main(model: str, out_path: str, backend: str = "fastrec", batch_size: str = "100") -> None:
    torch.set_num_threads(1)
    config = train.TrainConfig(
        model=model,
        data="synthetic",
        backend=backend,
        epochs=2,
        batch_size=int(batch_size),
        max_len=6,
        dropout=0.0,
        progress=False,
        seed=3,
    )
    data = train.load_data(config, MODELS[model].padding_side)
    net = train.build_model(config, data.n_items, data.n_users)
    epochs, _ = train.fit(net, data, config, log=lambda _: None)
    if dist.get_rank() == 0:
        last = {k: v.clone() for k, v in net.state_dict().items()}
        torch.save({"losses": [e.loss for e in epochs], "state": last, "world": dist.get_world_size()}, out_path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
