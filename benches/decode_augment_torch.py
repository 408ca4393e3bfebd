"""torchvision baseline for benches/decode_augment.rs.

Usage: decode_augment_torch.py FILE_LIST THREADS PASSES
  FILE_LIST  a text file of JPEG paths, one a line (read into memory once)
  THREADS    comma-separated DataLoader worker counts, e.g. 1,2
  PASSES     timed passes (after one warm-up pass)

Prints `pillow RATE` (Pillow + transforms on this thread, no DataLoader) and `loader T RATE`
for each T, in images per second.
"""
import io
import sys
import time

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

TRANSFORM = T.Compose(
    [
        T.RandomResizedCrop(224),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ]
)


class InMemory(Dataset):
    def __init__(self, paths):
        self.data = []
        for p in paths:
            with open(p, "rb") as f:
                self.data.append(f.read())

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        img = Image.open(io.BytesIO(self.data[i])).convert("RGB")
        return TRANSFORM(img)


def one_thread(_worker_id):
    torch.set_num_threads(1)


def main():
    list_file, threads, passes = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with open(list_file) as f:
        paths = [line for line in f.read().split("\n") if line]
    torch.set_num_threads(1)
    ds = InMemory(paths)
    n = len(ds)

    for i in range(n):  # warm-up
        ds[i]
    start = time.perf_counter()
    for _ in range(passes):
        for i in range(n):
            ds[i]
    print(f"pillow {n * passes / (time.perf_counter() - start):.1f}", flush=True)

    for t in (int(x) for x in threads.split(",")):
        loader = DataLoader(ds, batch_size=64, shuffle=True, num_workers=t, worker_init_fn=one_thread,
                            persistent_workers=True)
        for _ in loader:  # warm-up (starts the workers)
            pass
        start = time.perf_counter()
        for _ in range(passes):
            for _ in loader:
                pass
        print(f"loader {t} {n * passes / (time.perf_counter() - start):.1f}", flush=True)
        del loader


if __name__ == "__main__":
    main()
