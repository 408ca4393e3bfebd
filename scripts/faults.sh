#!/usr/bin/env bash
# Long fault drills: N seeded runs of a job on 2-3 local workers (`thaw launch`), each with one
# injected failure of a random kind at a random step (LeNet-5 on 24,000 Fashion-MNIST samples,
# 2 epochs; `mnv2` runs a MobileNetV2 subset under progressive unfreezing instead):
#   kill    kill -9 a worker; --max-restarts 1 respawns it (world comes back)
#   stop    SIGSTOP a worker of 3 (--min-nproc 2): dropped at the heartbeat deadline
#   term    SIGTERM a worker of 3 (--min-nproc 2): a graceful leave
#   ckpt    kill -9 a worker while checkpoints are written every 5 steps
#   ckptw   rank 0 killed half-way through writing a checkpoint (failpoint `checkpoint-write`)
#   eval    a worker killed during evaluation (failpoint `evaluate`)
#   stage   a worker killed as a new freeze stage begins (failpoint `stage-change`; the
#           MobileNetV2 subset under progressive unfreezing)
#   add     a third worker joins mid-epoch (--max-nproc 3)
#   mnv2    kill -9 a worker of a MobileNetV2 subset (progressive unfreezing, 2 epochs)
# Every run's ledger (THAW_LEDGER_DIR) is checked: every sample of every epoch trained exactly
# once, steps lost per failure, and every checkpoint on disk loads. Prints one line per run and a
# table at the end. Usage: bash scripts/faults.sh [N=20] [SEED=1]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
source scripts/release.sh >/dev/null
n_runs=${1:-20}
seed=${2:-1}
thaw="$root/target/release/thaw"
work=$(mktemp -d)
trap 'pkill -P $$ 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT
RANDOM=$seed
results="$work/results.tsv"
: >"$results"
for run in $(seq 1 "$n_runs"); do
  kinds=(kill stop term ckpt ckptw eval stage add mnv2)
  kind=${kinds[$((RANDOM % 9))]}
  at=$((20 + RANDOM % 400))
  dir="$work/run$run"
  mkdir -p "$dir"
  extra=""
  schedule=""
  model=$'arch = "lenet5"\nweights = "none"'
  data=""
  n=24000
  failpoint=""
  args=(--nproc 2 --max-restarts 1)
  case $kind in
    stop | term) args=(--nproc 3 --min-nproc 2) ;;
    ckpt) extra=$'checkpoint_every_steps = 5\nkeep_checkpoints = 3' ;;
    ckptw)
      extra=$'checkpoint_every_steps = 5\nkeep_checkpoints = 3'
      failpoint="checkpoint-write:$dir/fired" ;;
    eval) failpoint="evaluate@$((RANDOM % 2)):$dir/fired" ;;
    stage)
      model=$'arch = "mobilenet_v2"\nweights = "imagenet"'
      data="image_size = 32"
      n=1536
      schedule=$'[schedule]\nstrategy = "progressive"\nevery = 1'
      failpoint="stage-change@$((RANDOM % 2)):$dir/fired" ;;
    add) args=(--nproc 2 --max-nproc 3) ;;
    mnv2)
      model=$'arch = "mobilenet_v2"\nweights = "imagenet"'
      data="image_size = 32"
      n=1536
      at=$((5 + RANDOM % 80))
      schedule=$'[schedule]\nstrategy = "progressive"\nevery = 1' ;;
  esac
  cat >"$dir/job.toml" <<EOF
name = "drill"
seed = $run
[model]
$model
[data]
format = "idx"
root = "$root/.thaw/data/fashion-mnist"
train_limit = $n
val_limit = 500
$data
[train]
epochs = 2
batch_size = 16
lr = 0.05
momentum = 0.9
$schedule
[output]
dir = "$dir/out"
$extra
[distributed]
heartbeat_timeout_secs = 1.5
step_timeout_secs = 4.0
rejoin_timeout_secs = 60.0
EOF
  THAW_FAILPOINT="$failpoint" THAW_LEDGER_DIR="$dir/ledger" "$thaw" launch "${args[@]}" "$dir/job.toml" >"$dir/launch.out" 2>"$dir/launch.err" &
  launcher=$!
  url=""
  for _ in $(seq 100); do
    url=$(grep -o 'http://127.0.0.1:[0-9]*' "$dir/launch.err" | head -1 || true)
    [ -n "$url" ] && break
    sleep 0.1
  done
  # Wait for the step (or for the failpoint to fire), then inject.
  injected=""
  while kill -0 $launcher 2>/dev/null; do
    if [ -n "$failpoint" ]; then
      if [ -e "$dir/fired" ]; then injected=$(date +%s.%N); break; fi
      sleep 0.02
      continue
    fi
    step=$("$thaw" status drill --json --coordinator "$url" 2>/dev/null | python3 -c 'import sys,json; j=json.load(sys.stdin); j=j[0] if isinstance(j,list) else j; print(j["progress"]["step"] + 1000*j["progress"]["epoch"])' 2>/dev/null || echo 0)
    if [ "$step" -ge "$at" ]; then
      victim=$(pgrep -P $launcher | tail -1)
      case $kind in
        kill | ckpt | mnv2) kill -9 "$victim" ;;
        stop) kill -STOP "$victim"; (sleep 8; kill -9 "$victim" 2>/dev/null || true) & ;;
        term) kill -TERM "$victim" ;;
        add) THAW_LEDGER_DIR="$dir/ledger" "$thaw" worker --job drill --coordinator "$url" >"$dir/added.log" 2>&1 & ;;
      esac
      injected=$(date +%s.%N)
      break
    fi
    sleep 0.05
  done
  # Recovery time: from the injection to the first step trained by the next generation.
  rec=""
  if [ -n "$injected" ]; then
    while kill -0 $launcher 2>/dev/null; do
      # One grep: with pipefail, grep -q closing a pipe early fails the whole pipeline.
      if grep -qh '"gen":2,.*"x"' "$dir"/ledger/*.jsonl 2>/dev/null; then
        rec=$(python3 -c "print(f'{$(date +%s.%N) - $injected:.2f}')")
        break
      fi
      sleep 0.05
    done
  fi
  wait $launcher && code=0 || code=$?
  wait 2>/dev/null || true
  [ -z "$injected" ] && echo "run $run: nothing was injected ($kind at $at); see $dir" >&2
  [ -d "$dir/ledger" ] || { echo "run $run: the job never trained; see $dir" >&2; echo -e "$kind\t$code\tNA\tNA\tNA\tNA\tNA" >>"$results"; continue; }
  python3 - "$dir" "$kind" "$code" "${rec:-NA}" "$n" >>"$results" <<'PY'
import json, os, subprocess, sys
from collections import Counter, defaultdict
d, kind, code, rec, n = sys.argv[1:]
n = int(n)
steps, committed = defaultdict(list), {}
for f in os.listdir(f"{d}/ledger"):
    for line in open(f"{d}/ledger/{f}"):
        v = json.loads(line)
        if "x" in v:
            steps[(v["gen"], v["e"], v["s"])].extend(v["x"])
        elif v.get("source") and v["gen"] > 1:
            committed[v["gen"] - 1] = tuple(v["before"])
last = max((k[0] for k in steps), default=0)
counts, lost = defaultdict(Counter), Counter()
for (g, e, s), xs in steps.items():
    end = None if g == last else committed.get(g, (0, 0))
    if end is None or (e, s) < end:
        counts[e].update(xs)
    else:
        lost[g] += 1
repeated = sum(c - 1 for e in counts for c in counts[e].values() if c > 1)
missing = sum(n - len(counts[e]) for e in range(2))
corrupt = 0
for f in os.listdir(f"{d}/out"):
    if f.startswith("checkpoint") and f.endswith(".safetensors"):
        # Complete: the header parses and the data is exactly as long as the header says.
        try:
            path = f"{d}/out/{f}"
            with open(path, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little"); h = json.loads(fh.read(n))
            end = max(v["data_offsets"][1] for k, v in h.items() if k != "__metadata__")
            if os.path.getsize(path) != 8 + n + end or h["__metadata__"]["format"] != "thaw-checkpoint-v1":
                corrupt += 1
        except Exception:
            corrupt += 1
print(f"{kind}\t{code}\t{missing}\t{repeated}\t{max(lost.values(), default=0)}\t{corrupt}\t{rec}")
PY
  tail -1 "$results"
done
python3 - "$results" <<'PY'
import sys, statistics
from collections import defaultdict
rows = [l.split("\t") for l in open(sys.argv[1]).read().splitlines() if l]
by = defaultdict(list)
for r in rows:
    by[r[0]].append(r)
print("\n| kind | injected | jobs finished | samples lost | samples repeated | max steps lost per failure | corrupt checkpoints | recovery s (median / max) |")
print("|---|---|---|---|---|---|---|---|")
num = lambda v: 0 if v == "NA" else int(v)
for k, rs in sorted(by.items()):
    rec = [float(r[6]) for r in rs if r[6] != "NA"]
    med = f"{statistics.median(rec):.2f} / {max(rec):.2f}" if rec else "-"
    print(f"| {k} | {len(rs)} | {sum(r[1] == '0' for r in rs)} | {sum(num(r[2]) for r in rs)} | {sum(num(r[3]) for r in rs)} | {max(num(r[4]) for r in rs)} | {sum(num(r[5]) for r in rs)} | {med} |")
PY
