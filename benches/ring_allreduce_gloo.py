"""PyTorch gloo baseline for benches/ring_allreduce.rs: all-reduce between 2 local processes.

usage: ring_allreduce_gloo.py SIZES_MIB WARMUP ITERS
  SIZES_MIB: comma-separated buffer sizes in MiB of float32, e.g. 4,44,100

Starts two processes (backend gloo, init tcp://127.0.0.1:PORT on a free port); each iteration is a
barrier (not timed), then a timed dist.all_reduce (SUM: gloo has no AVG; the division a mean needs
is left out, which favours gloo). Prints one JSON object on stdout: {"MIB": median_ms, ...}.
"""
import json
import os
import socket
import statistics
import subprocess
import sys
import time


def worker(rank, port, sizes, warmup, iters):
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    result = {}
    for mib in sizes:
        t = torch.full((mib * (1 << 20) // 4,), float(rank + 1))
        times = []
        for i in range(warmup + iters):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(t)
            elapsed = (time.perf_counter() - start) * 1e3
            if i == 0 and t[0].item() != 3.0:
                raise SystemExit(f"gloo all_reduce gave {t[0].item()}, expected 3.0")
            if i >= warmup:
                times.append(elapsed)
        result[str(mib)] = statistics.median(times)
    dist.destroy_process_group()
    if rank == 0:
        print(json.dumps(result), flush=True)


def main():
    if len(sys.argv) == 7 and sys.argv[1] == "--rank":
        _, _, rank, port, sizes, warmup, iters = sys.argv
        worker(int(rank), int(port), [int(s) for s in sizes.split(",")], int(warmup), int(iters))
        return
    sizes, warmup, iters = sys.argv[1], sys.argv[2], sys.argv[3]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--rank", str(rank), str(port), sizes, warmup, iters],
            stdout=subprocess.PIPE if rank == 0 else subprocess.DEVNULL,
            env=os.environ,
        )
        for rank in range(2)
    ]
    out = procs[0].communicate()[0]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"gloo workers exited with {codes}")
    sys.stdout.write(out.decode())


if __name__ == "__main__":
    main()
