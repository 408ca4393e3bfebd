"""PyTorch baseline for benches/recovery.rs: LeNet-5 DDP on Fashion-MNIST under
`torchrun --max-restarts 1`, the way a PyTorch user makes a job survive a failure: rank 0 saves a
checkpoint (model, optimizer, position) every CKPT_EVERY steps; after a failure torchrun kills
the group, starts it again, and every rank loads the latest checkpoint and goes on from there.

Each rank appends one line per step it computes to LOG_DIR/rank-R.log: `time epoch step restart`,
and its pid to LOG_DIR/rank-R.pid, so the bench can kill it at a chosen step and count the steps
that were computed twice.

usage: torchrun --nproc-per-node 2 --max-restarts 1 recovery_torch.py DATA LIMIT EPOCHS BATCH CKPT_EVERY OUT LOG_DIR
"""
import gzip
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

data, limit, epochs, batch, every, out, logs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6], sys.argv[7]
torch.set_num_threads(1)
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
# The group's keys live under a per-restart prefix of torchrun's store: with the default, the
# restarted group reads the dead group's gloo addresses and fails to connect (torch 2.13).
store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False)
dist.init_process_group("gloo", store=dist.PrefixStore(f"restart-{restart}/", store), rank=rank, world_size=world)
os.makedirs(logs, exist_ok=True)
with open(f"{logs}/rank-{rank}.pid", "w") as f:
    f.write(str(os.getpid()))
log = open(f"{logs}/rank-{rank}.log", "a", buffering=1)


def idx(name):
    with gzip.open(f"{data}/{name}") as f:
        raw = f.read()
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


xs = torch.from_numpy(idx("train-images-idx3-ubyte.gz")[:limit].astype(np.float32) / 255.0).unsqueeze(1)
xs = (xs - 0.2860) / 0.3530
ys = torch.from_numpy(idx("train-labels-idx1-ubyte.gz")[:limit].astype(np.int64))


class LeNet5(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 6, 5, padding=2)
        self.c2 = nn.Conv2d(6, 16, 5)
        self.f1 = nn.Linear(16 * 5 * 5, 120)
        self.f2 = nn.Linear(120, 84)
        self.head = nn.Linear(84, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = F.max_pool2d(F.relu(self.c2(x)), 2)
        x = F.relu(self.f1(x.flatten(1)))
        return self.head(F.relu(self.f2(x)))


torch.manual_seed(21)
model = nn.parallel.DistributedDataParallel(LeNet5())
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
ckpt = f"{out}/checkpoint.pt"
start_epoch, start_step = 0, 0
if os.path.exists(ckpt):
    state = torch.load(ckpt, weights_only=False)
    model.module.load_state_dict(state["model"])
    opt.load_state_dict(state["optim"])
    start_epoch, start_step = state["epoch"], state["step"]
steps = limit // (batch * world)
for epoch in range(start_epoch, epochs):
    g = torch.Generator().manual_seed(21 + epoch)
    order = torch.randperm(limit, generator=g)
    mine = order[rank : steps * batch * world : world]
    for step in range(start_step if epoch == start_epoch else 0, steps):
        ids = mine[step * batch : (step + 1) * batch]
        opt.zero_grad()
        loss = F.cross_entropy(model(xs[ids]), ys[ids])
        loss.backward()
        opt.step()
        log.write(f"{time.time():.3f} {epoch} {step} {restart}\n")
        done = step + 1
        if rank == 0 and done % every == 0 and done < steps:
            tmp = f"{ckpt}.tmp"
            torch.save({"model": model.module.state_dict(), "optim": opt.state_dict(), "epoch": epoch, "step": done}, tmp)
            os.replace(tmp, ckpt)
    if rank == 0:
        tmp = f"{ckpt}.tmp"
        torch.save({"model": model.module.state_dict(), "optim": opt.state_dict(), "epoch": epoch + 1, "step": 0}, tmp)
        os.replace(tmp, ckpt)
dist.destroy_process_group()
