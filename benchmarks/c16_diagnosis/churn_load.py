"""16 client threads, each sending `per_thread` short greedy chat requests one after another
(different prompts and output lengths), so requests arrive and finish every few decode steps.
Prints tok/s over the whole run and the mean per-request latency."""
import json, sys, threading, time, urllib.request

url, threads, per_thread = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
lat = []


def one(i, j):
    n = 24 + 8 * ((i * 7 + j * 3) % 9)  # 24..88 new tokens
    body = {"text": f"<|im_start|>user\nTell me fact number {i * 100 + j} about the ocean, "
                    f"in {n // 8} sentences.<|im_end|>\n<|im_start|>assistant\n",
            "sampling_params": {"temperature": 0, "max_new_tokens": n, "ignore_eos": True}}
    req = urllib.request.Request(url + "/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t = time.time()
    with urllib.request.urlopen(req, timeout=900) as r:
        out = json.loads(r.read())
    lat.append(time.time() - t)
    return out["meta_info"]["completion_tokens"]


tokens = [0] * threads


def worker(i):
    for j in range(per_thread):
        tokens[i] += one(i, j)


t0 = time.time()
th = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
[x.start() for x in th]
[x.join() for x in th]
dt = time.time() - t0
print(f"{sum(tokens)} tokens in {dt:.1f} s: {sum(tokens) / dt:.1f} tok/s; "
      f"mean latency {sum(lat) / len(lat):.2f} s over {len(lat)} requests")
