#!/bin/bash
# usage: profile_server.sh {steady|churn} NAME PORT [server args...]
# Start a server, load it, py-spy its scheduler, print tok/s, stop the server.
#   steady: hold 16 greedy requests of 160 tokens (ignore_eos) in flight; py-spy 20 s mid-run.
#   churn:  churn_load.py, 16 client threads x 6 short requests; py-spy the whole run, idle included.
mode=$1; name=$2; port=$3; shift 3
OUT=${OUT:-/tmp/prof}; mkdir -p $OUT; HERE=$(cd "$(dirname "$0")" && pwd)
cd "$HERE/../.."
.venv/bin/sgl-longspec serve --port $port "$@" > $OUT/$name.server.log 2>&1 &
spid=$!
for i in $(seq 120); do curl -s localhost:$port/health >/dev/null && break; sleep 2; done
.venv/bin/python $HERE/steady_load.py http://127.0.0.1:$port 16 24 > /dev/null   # warm-up
spy() { .venv/bin/py-spy record -p "$(pgrep -f 'sglang::scheduler' | head -1)" -r 50 -f raw \
          -o $OUT/$name.folded --nonblocking "$@" > $OUT/$name.pyspy.log 2>&1; }
if [ "$mode" = steady ]; then
  .venv/bin/python $HERE/steady_load.py http://127.0.0.1:$port 16 160 > $OUT/$name.load.txt &
  lpid=$!
  sleep 12
  spy -d 20
  wait $lpid
  cat $OUT/$name.load.txt
else
  spy -d 600 --idle &
  ppid=$!
  .venv/bin/python $HERE/churn_load.py http://127.0.0.1:$port 16 6 | tee $OUT/$name.load.txt
  kill -INT $ppid; wait $ppid
fi
pkill -P $spid; kill $spid; sleep 3; pkill -f "sglang::" ; sleep 2
