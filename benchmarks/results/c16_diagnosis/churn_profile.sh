#!/bin/bash
# usage: churn_profile.sh NAME PORT [server args...]: start a server, run churn_load.py (16 threads x
# 6 short requests) under py-spy (idle samples included), print tok/s, stop the server.
name=$1; port=$2; shift 2
OUT=${OUT:-/tmp/prof}; mkdir -p $OUT; HERE=$(cd "$(dirname "$0")" && pwd)
cd "$HERE/../../.."
.venv/bin/sgl-longspec serve --port $port "$@" > $OUT/$name.server.log 2>&1 &
spid=$!
for i in $(seq 120); do curl -s localhost:$port/health >/dev/null && break; sleep 2; done
.venv/bin/python $HERE/steady_load.py http://127.0.0.1:$port 16 16 > /dev/null   # warm-up
sched=$(pgrep -f "sglang::scheduler" | head -1)
.venv/bin/py-spy record -p $sched -d 600 -r 50 -f raw --idle -o $OUT/$name.folded --nonblocking > $OUT/$name.pyspy.log 2>&1 &
ppid=$!
.venv/bin/python $HERE/churn_load.py http://127.0.0.1:$port 16 6 | tee $OUT/$name.load.txt
kill -INT $ppid; wait $ppid
pkill -P $spid; kill $spid; sleep 3; pkill -f "sglang::" ; sleep 2
