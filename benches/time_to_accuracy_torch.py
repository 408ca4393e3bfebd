"""PyTorch DDP baseline for benches/time_to_accuracy.rs: the usual transfer-learning recipe for
Fashion-MNIST, run under `torchrun --nproc-per-node 2` on gloo, one thread per rank.

torchvision's MobileNetV2 with its ImageNet weights (IMAGENET1K_V1, read from the .pth file), a new
10-class head; images resized to 64x64, grey copied to 3 channels, ImageNet normalisation; batch 64
per rank; SGD momentum 0.9. Epoch 1 trains the head only (lr LR, constant; the frozen trunk in
eval mode, as thaw's frozen groups are); then everything trains, the trunk at 0.1x LR, on one
cosine from LR to 0 over the remaining epochs. Each rank takes its half of a seeded permutation
every epoch (DistributedSampler's split).

After every epoch (and every EVAL_EVERY steps when it is above 0) both ranks evaluate their half of
the 10k test images and rank 0 prints `eval EPOCH STEP ACC SECONDS` (seconds since the script
started, imports included), then `reached ACC SECONDS` and exits once ACC >= TARGET.

usage: torchrun --nproc-per-node 2 time_to_accuracy_torch.py DATA WEIGHTS EPOCHS LR TARGET [EVAL_EVERY]
"""
import time

T0 = time.time()

import gzip
import math
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision

data, weights, epochs, lr, target = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
eval_every = int(sys.argv[6]) if len(sys.argv) > 6 else 0
SIZE, BATCH = 64, 64
torch.set_num_threads(1)
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(1)


def idx(name):
    with gzip.open(f"{data}/{name}") as f:
        raw = f.read()
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load(split):
    xs = torch.from_numpy(idx(f"{split}-images-idx3-ubyte.gz").copy()).unsqueeze(1)
    ys = torch.from_numpy(idx(f"{split}-labels-idx1-ubyte.gz").astype(np.int64))
    return xs, ys


MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def prepare(u8):
    """uint8 [N,1,28,28] -> normalised float [N,3,64,64] (Resize(64), Grayscale(3), Normalize)."""
    x = F.interpolate(u8.float() / 255.0, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
    return (x.expand(-1, 3, -1, -1) - MEAN) / STD


train_x, train_y = load("train")
test_x, test_y = load("t10k")

model = torchvision.models.mobilenet_v2()
model.load_state_dict(torch.load(weights, map_location="cpu"))
model.classifier[1] = torch.nn.Linear(model.last_channel, 10)
net = model
trunk = list(net.features.parameters())
head = list(net.classifier.parameters())
opt = torch.optim.SGD([{"params": trunk, "lr": 0.1 * lr}, {"params": head, "lr": lr}], lr=lr, momentum=0.9)

steps_per_epoch = len(train_x) // (BATCH * world)
fine_tune_steps = steps_per_epoch * max(epochs - 1, 1)


def evaluate():
    net.eval()
    correct = torch.zeros(1)
    with torch.no_grad():
        for i in range(rank * BATCH, len(test_x), BATCH * world):
            logits = net(prepare(test_x[i : i + BATCH]))
            correct += (logits.argmax(1) == test_y[i : i + BATCH]).sum()
    dist.all_reduce(correct)
    return correct.item() / len(test_x)


def report(epoch, step):
    acc = evaluate()
    seconds = time.time() - T0
    if rank == 0:
        print(f"eval {epoch} {step} {acc:.4f} {seconds:.1f}", flush=True)
    if acc >= target:
        if rank == 0:
            print(f"reached {acc:.4f} {seconds:.1f}", flush=True)
        dist.destroy_process_group()
        sys.exit(0)


step = 0
for epoch in range(1, epochs + 1):
    head_only = epoch == 1
    if epoch <= 2:
        # DDP reduces the parameters that require gradients when it is built: build it again
        # when the trunk is unfrozen.
        for p in trunk:
            p.requires_grad_(not head_only)
        model = torch.nn.parallel.DistributedDataParallel(net)
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(epoch))
    mine = order[rank * steps_per_epoch * BATCH : (rank + 1) * steps_per_epoch * BATCH]
    for s in range(steps_per_epoch):
        net.train()
        if head_only:
            net.features.eval()
        else:
            t = (step - steps_per_epoch) / fine_tune_steps
            opt.param_groups[0]["lr"] = 0.1 * lr * 0.5 * (1 + math.cos(math.pi * t))
            opt.param_groups[1]["lr"] = lr * 0.5 * (1 + math.cos(math.pi * t))
        b = mine[s * BATCH : (s + 1) * BATCH]
        opt.zero_grad()
        loss = F.cross_entropy(model(prepare(train_x[b])), train_y[b])
        loss.backward()
        opt.step()
        step += 1
        if eval_every and step % eval_every == 0 and s + 1 < steps_per_epoch:
            report(epoch, step)
    report(epoch, step)
if rank == 0:
    print(f"not reached {target} {time.time() - T0:.1f}", flush=True)
dist.destroy_process_group()
