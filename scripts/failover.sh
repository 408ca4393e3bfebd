#!/usr/bin/env bash
# Coordinator failover figures: a 3-member etcd cluster (set-up's etcd 3.4), two
# `thaw coordinator --store etcd://...` (lease 3 s) and a 2-worker LeNet-5 job long enough for N
# kills. N times: kill -9 the active coordinator, time until the standby logs that it leads
# ("elected") and serves, start the killed one again as the new standby. At the end the job must
# succeed with every sample of every epoch trained once (the workers' ledger), and the longest
# pause in training (the largest gap between two steps of a worker) is reported next to the
# failover times, median and max. Usage: bash scripts/failover.sh [N=10]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
source scripts/release.sh >/dev/null
n_kills=${1:-10}
exec python3 - "$root" "$n_kills" <<'PY'
import calendar, json, os, re, signal, socket, statistics, subprocess, sys, tempfile, time
from collections import Counter, defaultdict

root, n_kills = sys.argv[1], int(sys.argv[2])
thaw = f"{root}/target/release/thaw"
work = tempfile.mkdtemp(prefix="thaw-failover-")
procs = []

def port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

def spawn(args, log, **kw):
    p = subprocess.Popen(args, stdout=kw.pop("stdout", subprocess.DEVNULL), stderr=open(log, "a"), **kw)
    procs.append(p)
    return p

try:
    peers, clients = [port() for _ in range(3)], [port() for _ in range(3)]
    cluster = ",".join(f"m{i}=http://127.0.0.1:{peers[i]}" for i in range(3))
    for i in range(3):
        c = f"http://127.0.0.1:{clients[i]}"
        spawn([f"{root}/.thaw/bin/etcd", "--name", f"m{i}", "--data-dir", f"{work}/m{i}", "--listen-client-urls", c,
               "--advertise-client-urls", c, "--listen-peer-urls", f"http://127.0.0.1:{peers[i]}",
               "--initial-advertise-peer-urls", f"http://127.0.0.1:{peers[i]}", "--initial-cluster", cluster,
               "--initial-cluster-state", "new", "--heartbeat-interval", "50", "--election-timeout", "500"], f"{work}/m{i}.log")
    store = "etcd://" + ",".join(f"127.0.0.1:{p}" for p in clients)
    ports = [port(), port()]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    logs, started = ["", ""], Counter()
    def coordinator(i):
        # One log per process: a restarted coordinator's log starts empty.
        started[i] += 1
        logs[i] = f"{work}/coord{i}.{started[i]}.log"
        return spawn([thaw, "coordinator", "--listen", f"127.0.0.1:{ports[i]}", "--store", store, "--lease-secs", "3"],
                     logs[i], env={**os.environ, "RUST_LOG": "info"})
    coords = [coordinator(0), coordinator(1)]
    env = {**os.environ, "THAW_COORDINATOR": ",".join(urls), "THAW_LEDGER_DIR": f"{work}/ledger"}
    samples, epochs = 24000, 3 + n_kills // 3
    with open(f"{work}/job.toml", "w") as f:
        f.write(f'name = "failover"\nseed = 1\n[model]\narch = "lenet5"\nweights = "none"\n[data]\nformat = "idx"\n'
                f'root = "{root}/.thaw/data/fashion-mnist"\ntrain_limit = {samples}\nval_limit = 500\n[train]\n'
                f'epochs = {epochs}\nbatch_size = 16\nlr = 0.05\n[output]\ndir = "{work}/out"\n[distributed]\nworkers = 2\n')
    time.sleep(2)
    subprocess.run([thaw, "submit", f"{work}/job.toml"], env=env, check=True, stdout=subprocess.DEVNULL)
    workers = [spawn([thaw, "worker", "--job", "failover"], f"{work}/w{i}.log", env=env) for i in range(2)]

    def leader():
        """The index of the coordinator whose log last says it was elected and not deposed."""
        best = None
        for i in range(2):
            log = open(logs[i]).read()
            e, d = log.rfind("elected: this coordinator leads"), log.rfind("stepping down")
            if e > d and coords[i].poll() is None:
                best = i
        return best

    def stamp(line):
        m = re.match(r"(\d+-\d+-\d+T\d+:\d+:\d+\.\d+)Z", line)
        return calendar.timegm(time.strptime(m.group(1)[:19], "%Y-%m-%dT%H:%M:%S")) + float("0." + m.group(1)[20:])

    failovers = []
    time.sleep(8)
    for k in range(n_kills):
        old = leader()
        if old is None or any(w.poll() is not None for w in workers):
            break
        new = 1 - old
        seen = open(logs[new]).read().count("elected: this coordinator leads")
        coords[old].send_signal(signal.SIGKILL); coords[old].wait()
        killed = time.time()
        while open(logs[new]).read().count("elected: this coordinator leads") == seen:
            if time.time() - killed > 60:
                sys.exit(f"kill {k + 1}: the standby never took over (see {work})")
            time.sleep(0.05)
        line = [l for l in open(logs[new]) if "elected: this coordinator leads" in l][-1]
        failovers.append(stamp(line) - killed)
        print(f"kill {k + 1}: coordinator {old} killed, {new} leads after {failovers[-1]:.2f} s", flush=True)
        coords[old] = coordinator(old)
        time.sleep(6)
    codes = [w.wait() for w in workers]
    # The ledger: exactly once (committed steps) and the longest pause between two steps.
    steps, committed, times = defaultdict(list), {}, defaultdict(list)
    for f in os.listdir(f"{work}/ledger"):
        for line in open(f"{work}/ledger/{f}"):
            v = json.loads(line)
            if "x" in v:
                steps[(v["gen"], v["e"], v["s"])].extend(v["x"])
                times[f].append(v["t"] / 1000)
            elif v.get("source") and v["gen"] > 1:
                committed[v["gen"] - 1] = tuple(v["before"])
    last = max(k[0] for k in steps)
    counts = defaultdict(Counter)
    for (g, e, s), xs in steps.items():
        if g == last or (e, s) < committed.get(g, (0, 0)):
            counts[e].update(xs)
    once = all(len(counts[e]) == samples and max(counts[e].values()) == 1 for e in range(epochs))
    pause = max(max(b - a for a, b in zip(sorted(t), sorted(t)[1:])) for t in times.values())
    print(f"\njob: workers exited {codes}; every sample of {epochs} epochs once: {once}")
    print("| kills | failover s (kill to elected), median / max | longest pause in training s |")
    print("|---|---|---|")
    print(f"| {len(failovers)} | {statistics.median(failovers):.2f} / {max(failovers):.2f} | {pause:.2f} |")
    if codes != [0, 0] or not once:
        sys.exit(f"the job did not finish cleanly (see {work})")
finally:
    for p in procs:
        if p.poll() is None:
            p.kill()
PY
