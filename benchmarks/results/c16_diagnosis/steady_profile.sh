#!/bin/bash
# usage: steady_profile.sh NAME PORT [server args...]: start a server, hold 16 greedy requests of
# 160 tokens (ignore_eos) in flight, py-spy the scheduler for 20 s, print tok/s, stop the server.
name=$1; port=$2; shift 2
OUT=${OUT:-/tmp/prof}; mkdir -p $OUT; HERE=$(cd "$(dirname "$0")" && pwd)
cd "$HERE/../../.."
.venv/bin/sgl-longspec serve --port $port "$@" > $OUT/$name.server.log 2>&1 &
spid=$!
for i in $(seq 120); do curl -s localhost:$port/health >/dev/null && break; sleep 2; done
.venv/bin/python $HERE/steady_load.py http://127.0.0.1:$port 16 24 > /dev/null   # warm-up
.venv/bin/python $HERE/steady_load.py http://127.0.0.1:$port 16 160 > $OUT/$name.load.txt &
lpid=$!
sleep 12
sched=$(pgrep -f "sglang::scheduler" | head -1)
.venv/bin/py-spy record -p $sched -d 20 -r 50 -f raw -o $OUT/$name.folded --nonblocking > $OUT/$name.pyspy.log 2>&1
wait $lpid
cat $OUT/$name.load.txt
pkill -P $spid; kill $spid; sleep 3; pkill -f "sglang::" ; sleep 2
