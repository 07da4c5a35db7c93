#!/bin/bash
# usage: run.sh N SECS  (server on core 0; redis, feed, clients on core 1)
# Issue 15 item 5: a real server (scripts/quiet_tail/server_probe.py, loop blocks, GC pauses and
# lease refresh rounds) pinned to core 0; redis-server, a quiet feed (500 tickers at 0.05 Hz)
# and N gRPC streams x 5 tickers (clients.py: latency per 10 s window and the server-side
# histogram) on core 1. SERVICE=path/to/service runs another version of the server.
set -u
HERE=$(cd "$(dirname "$0")" && pwd); WORK=$(mktemp -d)
N=$1; SECS=$2; cd "$HERE/../.."
PY=${PY:-.venv/bin/python}; export PYTHONPATH=${SERVICE:-$PWD/service}
free() { $PY -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
RP=$(free); GP=$(free); HP=$(free)
taskset -c 1 redis-server --port $RP --bind 127.0.0.1 --save "" --appendonly no --dir "$WORK" >/dev/null 2>&1 & RPID=$!
sleep 0.5
NOREFRESH=${NOREFRESH:-} URL=redis://127.0.0.1:$RP/0 GRPC=$GP HTTP=$HP taskset -c 0 $PY $HERE/server_probe.py > $WORK/server.out 2>$WORK/server.err & SPID=$!
env -u PRICESTREAM_REDIS_URL PRICESTREAM_REDIS_URL=redis://127.0.0.1:$RP/0 taskset -c 1 $PY -m pricestream feed --tickers 500 --rate 25 2>/dev/null & FPID=$!
for i in $(seq 50); do grep -q ready $WORK/server.out && break; sleep 0.2; done
HTTP=$HP taskset -c 1 $PY $HERE/clients.py 127.0.0.1:$GP $N 5 500 20 $SECS
sleep 1; cat $WORK/server.out; tail -3 $WORK/server.err
kill $FPID $SPID; sleep 1; kill $RPID; wait
