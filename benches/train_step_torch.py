"""PyTorch eager baseline for benches/train_step.rs: prints the median ms of one training step.

usage: train_step_torch.py ARCH SIZE BATCH STEPS THREADS [nchw|channels_last]
"""
import statistics
import sys
import time

import torch
import torchvision

arch, size, batch, steps, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
channels_last = len(sys.argv) > 6 and sys.argv[6] == "channels_last"
torch.set_num_threads(threads)
torch.manual_seed(0)
model = getattr(torchvision.models, arch)(weights=None, num_classes=1000)
model.train()
if channels_last:
    model = model.to(memory_format=torch.channels_last)
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
loss_fn = torch.nn.CrossEntropyLoss()
xs = torch.randn(batch, 3, size, size)
ys = torch.randint(0, 1000, (batch,))
if channels_last:
    xs = xs.contiguous(memory_format=torch.channels_last)
times = []
for i in range(steps + 2):
    t = time.perf_counter()
    opt.zero_grad()
    loss = loss_fn(model(xs), ys)
    loss.backward()
    opt.step()
    loss.item()
    if i >= 2:
        times.append((time.perf_counter() - t) * 1e3)
print(statistics.median(times))
