#!/usr/bin/env bash
# A real multi-node Ray cluster on this one machine: `ray start --head` plus worker nodes started with
# `ray start --address=...`, each in its own process group with its own resource label (jasper_node_<i>)
# so tasks and actors can be placed per node.
#
#   scripts/local_cluster.sh up [WORKERS]   start head + WORKERS worker nodes (default 2); prints RAY_ADDRESS
#   scripts/local_cluster.sh up-own-caches [WORKERS]
#                                           the same, but nodes share no dataset path: each node's processes get
#                                           their own node-local cache ($JASPER_RAY_CACHE=<state>/cache-<node>),
#                                           as machines without a shared filesystem have (serve from s3:// etc.)
#   scripts/local_cluster.sh status         nodes and resources
#   scripts/local_cluster.sh kill-node I    SIGKILL worker node I (a lost machine)
#   scripts/local_cluster.sh down           stop every node and check by pid that nothing is left
#
# State (pids, logs) lives in $JASPER_CLUSTER_DIR (default /tmp/jasper-local-cluster); the head listens
# on 127.0.0.1:$JASPER_CLUSTER_PORT (default 6390). `down` never runs `ray stop`, which would also stop
# unrelated Ray sessions on this machine.
set -euo pipefail
here=$(cd "$(dirname "$(readlink -f "$0")")" && pwd)
# shellcheck source=../cluster/jasper-env.sh
source "$here/../cluster/jasper-env.sh"
state=${JASPER_CLUSTER_DIR:-/tmp/jasper-local-cluster}
port=${JASPER_CLUSTER_PORT:-6390}
address="127.0.0.1:$port"
cpus_per_node=${JASPER_CLUSTER_CPUS:-1}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
# A node that gets SIGTERM drains for up to 30 s first (for Ray Serve's proxies); `down` stops whole
# local nodes, which serve nothing: they stop at once.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}

start_node() {  # name, extra ray start args...; returns when the node has joined
  local name=$1; shift
  if [ -n "${own_caches:-}" ]; then  # every process of this node caches datasets here, and only here
    export JASPER_RAY_CACHE="$state/cache-$name"
    mkdir -p "$JASPER_RAY_CACHE"
  fi
  # setsid: the node is its own process group, so `down` and `kill-node` reach all its processes.
  setsid ray start --block --num-cpus="$cpus_per_node" $JASPER_RAY_START_FLAGS "$@" >"$state/$name.log" 2>&1 &
  echo $! >"$state/$name.pid"
  for _ in $(seq 1 240); do
    grep -q "Ray runtime started" "$state/$name.log" && return 0
    kill -0 "$(cat "$state/$name.pid")" 2>/dev/null || break
    sleep 0.5
  done
  echo "local_cluster: node $name did not start; see $state/$name.log" >&2
  return 1
}

group_pids() {  # pgid -> pids of that process group still running (zombies have exited)
  ps -eo pid=,pgid=,stat= | awk -v g="$1" '$2 == g && $3 !~ /^Z/ {print $1}'
}

stop_group() {  # signal, pgid...: signal every group at once, wait up to 10 s for all, then KILL what is left
  local sig=$1; shift
  local pgid left
  for pgid in "$@"; do kill "-$sig" -- "-$pgid" 2>/dev/null || true; done
  for _ in $(seq 1 50); do
    left=""
    for pgid in "$@"; do [ -n "$(group_pids "$pgid")" ] && left="$left $pgid"; done
    [ -z "$left" ] && return 0
    sleep 0.2
  done
  for pgid in $left; do kill -KILL -- "-$pgid" 2>/dev/null || true; done
  sleep 0.5
  for pgid in $left; do
    [ -z "$(group_pids "$pgid")" ] || { echo "local_cluster: processes left in group $pgid" >&2; return 1; }
  done
}

case "${1:-}" in
  up | up-own-caches)
    [ "$1" = up-own-caches ] && own_caches=1
    workers=${2:-2}
    if [ -e "$state/head.pid" ] && kill -0 "$(cat "$state/head.pid")" 2>/dev/null; then
      echo "local_cluster: already up at $address (run down first)" >&2; exit 1
    fi
    mkdir -p "$state" "$JASPER_SPILL_DIR"
    # Its own temp dir: `ray start` records the cluster address there, where a plain ray.init()
    # elsewhere on this machine will not find and join it.
    start_node head --head --port="$port" --temp-dir="$state/ray" --include-dashboard=false \
      --resources='{"jasper_node_0": 1}'
    for i in $(seq 1 "$workers"); do  # one at a time: nodes starting together race for ports
      start_node "worker$i" --address="$address" --resources="{\"jasper_node_$i\": 1}"
    done
    for _ in $(seq 1 60); do  # and wait until the head lists them all
      [ "$(ray status --address="$address" 2>/dev/null | grep -c ' node_')" -ge $((workers + 1)) ] && break
      sleep 1
    done
    echo "RAY_ADDRESS=$address"
    ;;
  status)
    ray status --address="$address"
    ;;
  kill-node)
    pid_file="$state/worker${2:?which worker}.pid"
    stop_group KILL "$(cat "$pid_file")"
    rm -f "$pid_file"
    ;;
  down)  # the workers at once (each takes seconds), then the head: workers that lose it wait for it to return
    pgids=()
    for pid_file in "$state"/worker*.pid; do
      [ -e "$pid_file" ] && pgids+=("$(cat "$pid_file")")
    done
    status=0
    [ ${#pgids[@]} -eq 0 ] || stop_group TERM "${pgids[@]}" || status=1
    [ ! -e "$state/head.pid" ] || stop_group TERM "$(cat "$state/head.pid")" || status=1
    rm -f "$state"/worker*.pid "$state"/head.pid
    exit $status
    ;;
  *)
    sed -n '2,17p' "$0" >&2; exit 2
    ;;
esac
