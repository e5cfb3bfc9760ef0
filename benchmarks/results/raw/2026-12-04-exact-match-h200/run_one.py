"""python run_one.py NAME [--no-cudnn] -- FLAGS: one train.py run (cuDNN attention off with --no-cudnn),
its wall time and its evaluation records, appended to $OUT/rows.jsonl."""
import json
import os
import subprocess
import sys
import time

name, rest = sys.argv[1], sys.argv[2:]
cudnn_off = "--no-cudnn" in rest
flags = rest[rest.index("--") + 1:]
out = os.path.join(os.environ["OUT"], name)
pre = "import torch; torch.backends.cuda.enable_cudnn_sdp(False); " if cudnn_off else ""
code = pre + ("import runpy, sys; sys.argv = ['train.py'] + sys.argv[1:]; "
              "runpy.run_path('train.py', run_name='__main__')")
t0 = time.time()
p = subprocess.run([sys.executable, "-c", code, *flags, "--output-dir", out + "/run"], capture_output=True, text=True)
wall = time.time() - t0
os.makedirs(out, exist_ok=True)
with open(out + "/log.txt", "w") as f:
    f.write(p.stdout + "\n----stderr----\n" + p.stderr)
rec = {"name": name, "rc": p.returncode, "wall_s": round(wall, 1), "cudnn_off": cudnn_off, "flags": " ".join(flags)}
try:
    with open(out + "/run/metrics.jsonl") as f:
        ms = [json.loads(line) for line in f]
    keys = ("step", "val_loss", "exact_match", "eval_s")
    rec["evals"] = [{k: m[k] for k in keys if k in m} for m in ms if "eval_s" in m]
    trained = [m for m in ms if "tokens_per_s" in m]
    if trained:
        rec["tokens_per_s"], rec["peak_gib"] = trained[-1]["tokens_per_s"], trained[-1].get("peak_mem_gib")
except Exception as e:
    rec["err"] = repr(e)[:200]
if p.returncode:
    rec["tail"] = (p.stderr or p.stdout)[-600:]
print(json.dumps(rec), flush=True)
with open(os.environ["OUT"] + "/rows.jsonl", "a") as f:
    f.write(json.dumps(rec) + "\n")
