import json, sys, threading, time, urllib.request
url = sys.argv[1]; n = int(sys.argv[2]); toks = int(sys.argv[3])
def one(i):
    body = {"text": f"<|im_start|>user\nWrite a long story about a robot number {i} who learns to paint.<|im_end|>\n<|im_start|>assistant\n",
            "sampling_params": {"temperature": 0, "max_new_tokens": toks, "ignore_eos": True}}
    req = urllib.request.Request(url + "/generate", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=900) as r: json.loads(r.read())
t = time.time(); th = [threading.Thread(target=one, args=(i,)) for i in range(n)]
[x.start() for x in th]; [x.join() for x in th]
dt = time.time() - t; print(f"{n} x {toks} tokens in {dt:.1f} s: {n*toks/dt:.1f} tok/s")
