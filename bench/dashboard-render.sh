#!/bin/bash
# Usage: cargo build --release -p producer -p worker -p pve-sim && bench/dashboard-render.sh
# Server-side render time of the dashboard's page of a 10,000-VM deployment, release
# `producer serve`, measured as curl's time to first byte (axum sends the page after the
# handler has built all of it). Release builds of pve-sim and two workers deploy the class.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
W=$ROOT/target
PROD=$W/release/producer
D=$(mktemp -d)
RP=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
SP=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
redis-server --port $RP --bind 127.0.0.1 --dir $D --save "" --appendonly no > $D/redis.log 2>&1 &
RPID=$!
$W/release/pve-sim --cluster $ROOT/data/sim/cluster.yml --listen 127.0.0.1:0 --time-scale 0 > $D/sim.log 2>&1 &
SPID=$!
for i in $(seq 100); do grep -q fingerprint $D/sim.log && break; sleep 0.1; done
ADDR=$(grep -o 'https://[0-9.:]*' $D/sim.log | head -1 | sed 's#https://##')
FP=$(grep fingerprint $D/sim.log | awk '{print $2}')
printf 'lab:\n  host: "%s"\n  user: "root@pam"\n  token_name: "labfleet"\n  token_secret: "a3058775-b2df-4b2b-9997-bdc0e3d45c01"\n  fingerprint: "%s"\n' "$ADDR" "$FP" > $D/connections.yml
cp $ROOT/bench/data/overhead/deployment_config.yml $D/
python3 -c 'print("users:"); [print(f"  - \"s{i:05}@pve\"") for i in range(1,5001)]' > $D/users.yml
export LABFLEET_SECRET_KEY=$($PROD secret keygen)
R=redis://127.0.0.1:$RP
$PROD -q --data-dir $D --redis $R submit
$PROD --data-dir $D --redis $R serve --listen 127.0.0.1:$SP > $D/serve.log 2>&1 &
VPID=$!
for i in $(seq 100); do grep -q "dashboard on" $D/serve.log && break; sleep 0.1; done
URL="http://127.0.0.1:$SP/d/bench-overhead%40lab"
measure() {
  echo "$1 (load $(cut -d' ' -f1 /proc/loadavg)): time to first byte / total / bytes, 11 requests:"
  for i in $(seq 11); do curl -s -o /dev/null -w '%{time_starttransfer} %{time_total} %{size_download}\n' "$URL"; done
}
measure "every VM pending"
$W/release/worker --redis $R --data-dir $D --concurrency 16 --name m1 -q > $D/w1.log 2>&1 &
W1=$!
$W/release/worker --redis $R --data-dir $D --concurrency 16 --name m2 -q > $D/w2.log 2>&1 &
W2=$!
t0=$(date +%s)
while true; do
  st=$($PROD --data-dir $D --redis $R status bench-overhead@lab --json 2>/dev/null | python3 -c 'import sys,json;print(json.load(sys.stdin)["state"])')
  [ "$st" = done ] && break
  [ $(( $(date +%s) - t0 )) -gt 900 ] && { echo "not done after 900 s: $st"; break; }
  sleep 2
done
echo "deployed in $(( $(date +%s) - t0 )) s"
measure "every VM done"
kill $W1 $W2 $VPID $SPID $RPID 2>/dev/null
wait 2>/dev/null
rm -rf $D
