"""PyTorch's side of benches/gpu.rs: ResNet50 training images/s on cuda:0, batch B, 224x224,
channels-last, bf16 autocast with f32 master weights, SGD with momentum, random inputs; the same
warm-up (5 steps) and timed steps as thaw's side. Prints images/s on the last line.

usage: python gpu_torch.py BATCH STEPS
"""
import sys
import time

import torch
import torchvision


def main() -> None:
    batch, steps = int(sys.argv[1]), int(sys.argv[2])
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    dev = torch.device("cuda:0")
    model = torchvision.models.resnet50(num_classes=1000).to(dev, memory_format=torch.channels_last)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    xs = torch.randn(batch, 3, 224, 224, device=dev).contiguous(memory_format=torch.channels_last)
    ys = torch.randint(0, 1000, (batch,), device=dev)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model(xs), ys)
        loss.backward()
        opt.step()

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name(0)}", file=sys.stderr)
    print(batch * steps / (time.perf_counter() - t))


if __name__ == "__main__":
    main()
