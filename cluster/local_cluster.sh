#!/usr/bin/env bash
# A real multi-node Ray cluster on one machine, loopback only, with token authentication.
#
#   cluster/local_cluster.sh start     # head + $EFFSFT_CLUSTER_WORKERS worker nodes
#   source "$EFFSFT_CLUSTER_DIR/env.sh" # RAY_ADDRESS (Jobs API), RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH
#   ray job submit --working-dir . -- python -m effsft prepare jobs/prepare.yaml
#   cluster/local_cluster.sh status
#   cluster/local_cluster.sh kill-node w1   # node loss: SIGKILL w1's process group
#   cluster/local_cluster.sh start-node w1  # w1 joins again (a new node id, fresh ports)
#   cluster/local_cluster.sh stop
#
# Every node is its own `ray start --block` process (its own raylet, object store, agents and
# ports), so scheduling, object transfer and node failure behave as on a real cluster; kill a
# worker node's pid (see `status`) to test fault tolerance.
#
# Isolation from any other Ray on the machine: its own state dir (token, pids, logs, Ray temp
# dir), every port chosen free at start (GCS, dashboard, agents, node manager, object manager;
# workers bind OS-chosen ports), and `stop` signals only the pids this script recorded (never
# `ray stop`, which would kill every Ray process on the machine).
#
# Loopback only: every node is started through cluster/ray_node.py, which keeps 127.0.0.1 as
# the node IP and GCS address (Ray's CLI would swap in the routable IP) and runs the node's
# processes with Ray's single-machine switch, so every service listens on 127.0.0.1. Token
# auth: a fresh 256-bit token in $DIR/auth_token (mode 600) that every node and client reads
# through RAY_AUTH_TOKEN_PATH (~/.ray/auth_token is left alone).
#
# Knobs (environment):
#   EFFSFT_CLUSTER_DIR          state dir                       (/tmp/effsft-cluster-$USER)
#   EFFSFT_CLUSTER_WORKERS      number of worker nodes          (1)
#   EFFSFT_CLUSTER_HEAD_CPUS    logical CPUs of the head        (1)
#   EFFSFT_CLUSTER_WORKER_CPUS  logical CPUs per worker node    (2)
#   EFFSFT_CLUSTER_OBJECT_STORE object store bytes per node     (268435456)
#   EFFSFT_CLUSTER_TIMEOUT      seconds to wait for start-up    (90)
#   PYTHON                      interpreter with ray[default]  (python3 on PATH)
# Worker node i (1-based) carries the custom resource {"node_w<i>": 1}, the head {"node_head": 1},
# so a job or a stage can be pinned, e.g. `ray job submit --entrypoint-resources '{"node_w1": 1}'`.
set -euo pipefail

DIR="${EFFSFT_CLUSTER_DIR:-/tmp/effsft-cluster-${USER:-$(id -un)}}"
WORKERS="${EFFSFT_CLUSTER_WORKERS:-1}"
HEAD_CPUS="${EFFSFT_CLUSTER_HEAD_CPUS:-1}"
WORKER_CPUS="${EFFSFT_CLUSTER_WORKER_CPUS:-2}"
OBJECT_STORE="${EFFSFT_CLUSTER_OBJECT_STORE:-268435456}"
TIMEOUT="${EFFSFT_CLUSTER_TIMEOUT:-90}"
PY="$(command -v "${PYTHON:-python3}")"
# Job drivers run `python ...` on the nodes: the interpreter's bin dir goes first on their PATH.
BIN="$(dirname "$PY")"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

die() { echo "local_cluster: $*" >&2; exit 1; }
alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Common environment of every node process (job drivers inherit it).
node_env=(env -u RAY_ADDRESS -u RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER PATH="$BIN:$PATH"
          RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$DIR/auth_token"
          RAY_USAGE_STATS_ENABLED=0 RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0
          RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S="${RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S:-300}")

free_ports() {  # N distinct free loopback ports (held open together, so they differ)
    "$PY" - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

# ---- queries against the dashboard (Jobs/State HTTP API), with the bearer token --------------
api() {  # api PATH -> JSON body on stdout
    "$PY" - "$(cat "$DIR/dashboard_url")" "$1" "$DIR/auth_token" <<'EOF'
import sys, urllib.request
url, path, token = sys.argv[1], sys.argv[2], open(sys.argv[3]).read().strip()
req = urllib.request.Request(url + path, headers={"Authorization": "Bearer " + token})
print(urllib.request.urlopen(req, timeout=5).read().decode())
EOF
}

alive_nodes() {  # number of ALIVE nodes, or nothing if the dashboard does not answer yet
    api "/api/v0/nodes?limit=100" 2>/dev/null | "$PY" -c '
import json, sys
nodes = json.load(sys.stdin)["data"]["result"]["result"]
print(sum(n["state"] == "ALIVE" for n in nodes))' 2>/dev/null || true
}

wait_nodes() {  # wait_nodes N: N nodes ALIVE; a worker node that dies starting is retried
    local want=$1 deadline=$((SECONDS + TIMEOUT)) n f name
    local -A retries=()
    while (( SECONDS < deadline )); do
        n="$(alive_nodes)"
        [[ "$n" == "$want" ]] && return 0
        for f in "$DIR"/pids/*.pid; do
            alive "$f" && continue
            name="$(basename "$f" .pid)"
            # On an overloaded machine a joining raylet can miss the GCS's start-up deadline
            # (60 s) and exit: start it again (fresh ports), twice at most.
            if [[ "$name" == w* ]] && (( ${retries[$name]:-0} < 2 )); then
                retries[$name]=$(( ${retries[$name]:-0} + 1 ))
                echo "local_cluster: node $name exited during start-up, retrying" >&2
                cp "$DIR/logs/$name.log" "$DIR/logs/$name.failed-${retries[$name]}.log" || true
                kill -KILL -- "-$(cat "$f")" 2>/dev/null || true   # what it left behind
                start_worker "${name#w}" "$(cat "$DIR/gcs_port")"
                continue
            fi
            die "node $name exited during start-up; see $DIR/logs/"
        done
        sleep 1
    done
    die "timed out after ${TIMEOUT}s waiting for $want alive nodes (have ${n:-0}); see $DIR/logs/"
}

start_node() {  # start_node NAME [RAY START ARGS...]
    local name=$1; shift
    setsid nohup "${node_env[@]}" "$PY" "$HERE/ray_node.py" start --block \
        --disable-usage-stats --object-store-memory "$OBJECT_STORE" \
        --min-worker-port 0 --max-worker-port 0 "$@" \
        >"$DIR/logs/$name.log" 2>&1 </dev/null &
    echo $! >"$DIR/pids/$name.pid"
}

start_worker() {  # start_worker I GCS_PORT: worker node w<I>, fresh ports
    # No --node-ip-address: Ray takes the address it reaches the head from. Its own temp dir:
    # by default a worker node takes the head's, and two nodes on one machine would then share
    # one session dir (logs, sockets, and the runtime-env unpack dir, where a job's working_dir
    # being unpacked again by the other node raced with the driver importing from it).
    local i=$1 gcs=$2 AGENT AGENT_GRPC RTENV METRICS NM OM
    read -r AGENT AGENT_GRPC RTENV METRICS NM OM < <(free_ports 6)
    start_node "w$i" --address "127.0.0.1:$gcs" \
        --dashboard-agent-listen-port "$AGENT" --dashboard-agent-grpc-port "$AGENT_GRPC" \
        --runtime-env-agent-port "$RTENV" --metrics-export-port "$METRICS" \
        --node-manager-port "$NM" --object-manager-port "$OM" \
        --num-cpus "$WORKER_CPUS" --resources "{\"node_w$i\": 1}" --temp-dir "$DIR/w$i"
}

start_head() {  # head on fresh ports; returns 1 if it exits before it is ALIVE
    read -r GCS DASH CLIENT AGENT AGENT_GRPC RTENV METRICS NM OM < <(free_ports 9)
    echo "http://127.0.0.1:$DASH" >"$DIR/dashboard_url"
    echo "$GCS" >"$DIR/gcs_port"
    start_node head --head --node-ip-address 127.0.0.1 --port "$GCS" \
        --include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port "$DASH" \
        --ray-client-server-port "$CLIENT" --dashboard-agent-listen-port "$AGENT" \
        --dashboard-agent-grpc-port "$AGENT_GRPC" --runtime-env-agent-port "$RTENV" \
        --metrics-export-port "$METRICS" --node-manager-port "$NM" --object-manager-port "$OM" \
        --temp-dir "$DIR/r" --num-cpus "$HEAD_CPUS" --resources '{"node_head": 1}'
    local deadline=$((SECONDS + TIMEOUT))
    # The head is registered and its dashboard answers before workers join.
    until [[ "$(alive_nodes)" == 1 ]]; do
        alive "$DIR/pids/head.pid" || return 1
        (( SECONDS < deadline )) || die "timed out after ${TIMEOUT}s waiting for the head"
        sleep 1
    done
}

cmd_start() {
    if alive "$DIR/pids/head.pid"; then
        echo "local_cluster: already running (state in $DIR)"; cmd_status; return 0
    fi
    mkdir -p "$DIR/pids" "$DIR/logs"
    rm -f "$DIR"/pids/*.pid
    trap 'echo "local_cluster: start failed, stopping what was started" >&2; cmd_stop >&2' EXIT
    (umask 077; "$PY" -c 'import secrets; print(secrets.token_hex(32))' >"$DIR/auth_token")
    local attempt
    for attempt in 1 2 3; do
        # On an overloaded machine the raylet can miss Ray's fixed 30 s registration deadline
        # and the node exits: start the head again on fresh ports (3 tries).
        start_head && break
        (( attempt < 3 )) || die "head failed to start 3 times; see $DIR/logs/head*.log"
        echo "local_cluster: head exited during start-up, retrying" >&2
        cp "$DIR/logs/head.log" "$DIR/logs/head.failed-$attempt.log" || true
        kill -KILL -- "-$(cat "$DIR/pids/head.pid")" 2>/dev/null || true
    done
    for i in $(seq 1 "$WORKERS"); do start_worker "$i" "$GCS"; done
    wait_nodes $((WORKERS + 1))
    cat >"$DIR/env.sh" <<EOF
# source me: clients of this cluster (ray job submit, JobSubmissionClient, ray status)
export RAY_ADDRESS=http://127.0.0.1:$DASH
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH=$DIR/auth_token
export EFFSFT_CLUSTER_GCS=127.0.0.1:$GCS
EOF
    "$PY" - "$DIR" "$GCS" "$DASH" "$WORKERS" <<'EOF'
import json, sys
d, gcs, dash, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
json.dump({"gcs_address": f"127.0.0.1:{gcs}", "dashboard_url": f"http://127.0.0.1:{dash}",
           "auth_token_path": f"{d}/auth_token", "temp_dir": f"{d}/r",
           "nodes": ["head"] + [f"w{i}" for i in range(1, n + 1)]},
          open(f"{d}/cluster.json", "w"), indent=2)
EOF
    trap - EXIT
    echo "local_cluster: up: head + $WORKERS worker node(s); dashboard http://127.0.0.1:$DASH"
    echo "local_cluster: clients: source $DIR/env.sh"
}

stop_pid() {  # SIGTERM (ray start --block then tears its node down), SIGKILL the group after 20 s
    local f=$1 pid
    pid="$(cat "$f")"
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    fi
    # setsid made the node its own process group: reap anything it left behind.
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$f"
}

cmd_stop() {
    [[ -d "$DIR/pids" ]] || { echo "local_cluster: not running (no $DIR/pids)"; return 0; }
    local f
    for f in "$DIR"/pids/w*.pid; do [[ -f "$f" ]] && stop_pid "$f"; done
    [[ -f "$DIR/pids/head.pid" ]] && stop_pid "$DIR/pids/head.pid"
    rm -f "$DIR/env.sh"
    echo "local_cluster: stopped (logs kept in $DIR/logs)"
}

cmd_status() {
    local f any=0
    for f in "$DIR"/pids/*.pid; do
        [[ -f "$f" ]] || continue
        any=1
        if alive "$f"; then state=running; else state=dead; fi
        echo "$(basename "$f" .pid) pid=$(cat "$f") $state"
    done
    (( any )) || { echo "local_cluster: not running"; return 3; }
    echo "alive nodes (GCS view): $(alive_nodes)"
}

node_name() {  # validate a worker node name w<I> (the head is not killed or restarted here)
    [[ "${1:-}" =~ ^w[1-9][0-9]*$ ]] || die "give a worker node name: w1, w2, ..."
}

tree_pids() {  # PID and all its descendants (by parent pid, whatever their process group)
    local todo=("$1") out=() p
    while ((${#todo[@]})); do
        p=${todo[0]}; todo=("${todo[@]:1}"); out+=("$p")
        todo+=($(ps -o pid= --ppid "$p" 2>/dev/null || true))
    done
    echo "${out[@]}"
}

cmd_kill_node() {  # abrupt node loss: SIGKILL the node's processes (raylet, agents, workers)
    node_name "${1:-}"
    local f="$DIR/pids/$1.pid" pid
    [[ -f "$f" ]] || die "no node $1 (see status)"
    pid="$(cat "$f")"
    # Ray 2.60's raylet puts every worker process in its own process group ("per-worker
    # process groups"): killing the node's group alone left the workers running (a Ray Train
    # rank kept training over gloo). Kill the whole process tree, then the group.
    kill -KILL $(tree_pids "$pid") 2>/dev/null || true
    kill -KILL -- "-$pid" 2>/dev/null || true
    for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    echo "local_cluster: killed node $1 (process group $pid)"
}

cmd_start_node() {  # (re)start worker node w<I> and wait until it is ALIVE: it joins as a new node
    node_name "${1:-}"
    alive "$DIR/pids/head.pid" || die "the head is not running"
    alive "$DIR/pids/$1.pid" && die "node $1 is running (kill-node it first)"
    [[ -f "$DIR/pids/$1.pid" ]] && kill -KILL -- "-$(cat "$DIR/pids/$1.pid")" 2>/dev/null || true
    local f want=0
    start_worker "${1#w}" "$(cat "$DIR/gcs_port")"
    for f in "$DIR"/pids/*.pid; do alive "$f" && want=$((want + 1)); done
    # Equality: also waits until the GCS has marked a killed node dead.
    wait_nodes "$want"
    echo "local_cluster: node $1 up"
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    kill-node) cmd_kill_node "${2:-}" ;;
    start-node) cmd_start_node "${2:-}" ;;
    *) echo "usage: $0 start|stop|status|kill-node wI|start-node wI   (state in \$EFFSFT_CLUSTER_DIR, default $DIR)" >&2; exit 2 ;;
esac
