#!/usr/bin/env bash
# The deployment end to end, with containers where no Kubernetes can run: thaw's CPU image and an
# etcd image on a user-defined Docker network, whose DNS names stand in for the Services:
#   1. etcd (thaw-etcd-0) and a first coordinator on it (thaw-coordinator-0, alias
#      thaw-coordinator), probed through `thaw health` (what the readiness probe asks);
#   2. the job submitted to http://thaw-coordinator:7070 (a Service's name);
#   3. two workers started against http://thaw-coordinator-b:7070, a name that does not resolve
#      yet (a Service whose pods are not up): they wait (THAW_CONNECT_TIMEOUT_SECS), not crash;
#   4. a second coordinator starts under that name, a standby: the workers resolve it, follow it
#      to the leader, join and train;
#   5. worker 1 is killed (docker kill: a pod's death) mid-job and started again (what the Job
#      controller does for its index): it rejoins and the job goes on;
#   6. the job must end `succeeded`, every worker container exiting 0.
# Prints each phase's time and the job's final status.
#   bash scripts/deploy-e2e.sh            # builds the images first if they are missing
# Needs root (or the docker group), a running dockerd, and scripts/setup.sh's data.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
image=${THAW_IMAGE:-thaw:$version-cpu}
etcd_image=thaw-etcd:3.4
net=thaw-e2e-$$
t0=$(date +%s)
phase_start=$t0
step() { printf '\033[1m[deploy-e2e %4ds]\033[0m %s\n' "$(( $(date +%s) - t0 ))" "$*"; }
phase() { local now; now=$(date +%s); printf '  took %d s\n' "$(( now - phase_start ))"; phase_start=$now; }
fail() { printf '\033[1;31m[deploy-e2e] FAILED:\033[0m %s\n' "$*" >&2; for c in $(docker ps -aq --filter "network=$net"); do echo "--- $(docker inspect -f '{{.Name}}' "$c")"; docker logs --tail 20 "$c" 2>&1; done; exit 1; }
cleanup() {
  docker rm -f $(docker ps -aq --filter "network=$net") >/dev/null 2>&1 || true
  docker network rm "$net" >/dev/null 2>&1 || true
  rm -rf "$runs"
}
runs=$(mktemp -d)
trap cleanup EXIT

docker info >/dev/null 2>&1 || fail "no Docker daemon (start dockerd)"
[ -f .thaw/data/fashion-mnist/train-images-idx3-ubyte.gz ] || bash scripts/setup.sh
docker image inspect "$image" >/dev/null 2>&1 || bash deploy/build-images.sh cpu
if ! docker image inspect "$etcd_image" >/dev/null 2>&1; then
  base=$(docker image inspect debian:bookworm-slim >/dev/null 2>&1 && echo debian:bookworm-slim || echo thaw-base:bookworm)
  [ "$base" = debian:bookworm-slim ] || bash deploy/base.sh thaw-base:bookworm
  docker build -q -f deploy/etcd.Dockerfile --build-arg BASE="$base" -t "$etcd_image" deploy >/dev/null
fi
step "images: $image ($(docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1/1e6}')), $etcd_image"
phase

docker network create "$net" >/dev/null
chmod 777 "$runs"
cat >"$runs/job.toml" <<'EOF'
name = "e2e"
seed = 7
[model]
arch = "lenet5"
weights = "none"
[data]
format = "idx"
root = "/data/fashion-mnist"
val_limit = 2000
[train]
epochs = 3
batch_size = 32
lr = 0.05
[schedule]
strategy = "scratch"
[distributed]
workers = 2
max_restarts = 3
heartbeat_timeout_secs = 10
rejoin_timeout_secs = 120
[output]
dir = "/runs/e2e"
checkpoint_every_steps = 50
EOF
thaw() { docker run --rm --network "$net" -v "$runs:/runs" -v "$root/.thaw/data:/data:ro" "$image" "$@"; }
wait_ready() { # NAME: its readiness as the probe asks it, for up to 60 s
  for _ in $(seq 60); do thaw health "$1:7071" --service thaw.v1.Jobs >/dev/null 2>&1 && return 0; sleep 1; done
  fail "$1 never ready"
}
coordinator() { # NAME ALIAS
  docker run -d --name "$1" --network "$net" --network-alias "$2" "$image" coordinator --listen 0.0.0.0:7070 \
    --health-listen 0.0.0.0:7071 --store etcd://thaw-etcd-0:2379 --prefix /thaw --advertise "http://$1:7070" \
    --lease-secs 5 --insecure >/dev/null
}

step "1. etcd and the first coordinator"
docker run -d --name thaw-etcd-0 --network "$net" "$etcd_image" --name thaw-etcd-0 --data-dir /var/lib/etcd/data \
  --listen-client-urls http://0.0.0.0:2379 --advertise-client-urls http://thaw-etcd-0:2379 >/dev/null
coordinator thaw-coordinator-0 thaw-coordinator
wait_ready thaw-coordinator-0
phase

step "2. submitting the job to http://thaw-coordinator:7070"
thaw submit /runs/job.toml --coordinator http://thaw-coordinator:7070 || fail "submit"
phase

step "3. two workers against http://thaw-coordinator-b:7070, which does not resolve yet"
for i in 0 1; do
  docker run -d --name "thaw-worker-$i" --hostname "e2e-$i" --network "$net" -v "$runs:/runs" -v "$root/.thaw/data:/data:ro" \
    --shm-size 256m -e THAW_CONNECT_TIMEOUT_SECS=120 -e THAW_TORCH_THREADS=1 "$image" \
    worker --job e2e --coordinator http://thaw-coordinator-b:7070 --bind-host "e2e-$i" >/dev/null
done
sleep 6
for i in 0 1; do
  [ "$(docker inspect -f '{{.State.Running}}' "thaw-worker-$i")" = true ] || fail "worker $i did not wait for the name"
done
docker logs thaw-worker-0 2>&1 | grep -q "coordinator not reachable yet" || fail "worker 0 logged no wait"
step "   both still running after 6 s, waiting for the name"
phase

step "4. a standby coordinator appears as thaw-coordinator-b"
coordinator thaw-coordinator-b thaw-coordinator-b
wait_ready thaw-coordinator-b
for _ in $(seq 120); do
  thaw status e2e --coordinator http://thaw-coordinator:7070 --json 2>/dev/null | grep -q '"running"' && break
  sleep 1
done
thaw status e2e --coordinator http://thaw-coordinator:7070 --json | grep -q '"running"' || fail "the job never ran"
step "   the workers followed the standby to the leader; the job is running"
phase

step "5. killing worker 1 (a pod's death) mid-epoch and starting it again"
for _ in $(seq 60); do
  docker logs thaw-worker-0 2>&1 | grep -q "ring formed" && break
  sleep 1
done
sleep 4
docker kill thaw-worker-1 >/dev/null || fail "worker 1 was not running"
sleep 2
docker start thaw-worker-1 >/dev/null
phase

step "6. waiting for the job to finish"
for c in thaw-worker-0 thaw-worker-1; do
  code=$(timeout 900 docker wait "$c") || fail "$c did not finish within 15 minutes"
  [ "$code" = 0 ] || fail "$c exited with $code"
done
status=$(thaw status e2e --coordinator http://thaw-coordinator:7070)
echo "$status"
echo "$status" | grep -q succeeded || fail "the job did not succeed"
docker logs thaw-worker-0 2>&1 | grep "final validation accuracy" || true
docker logs thaw-worker-1 2>&1 | grep -E "joined|rank" | tail -3 || true
phase
step "OK: etcd, 2 coordinators and 2 workers in containers ran the job to the end ($(( $(date +%s) - t0 )) s)"
