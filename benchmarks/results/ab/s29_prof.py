# ruff: noqa
import os, sys, time, glob, gzip, json, collections, re
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np, tensorflow as tf
from benchmarks import speed
jit = sys.argv[1] == "xla"
ops, dist, to_noise, conds, x, x_big = speed._operations("naf-dsf")
step, arg = ops["train_step"]
f = tf.function(step, jit_compile=jit)
for _ in range(5): f(arg).numpy()
t0 = time.perf_counter()
for _ in range(20): f(arg).numpy()
print("ms/step", (time.perf_counter() - t0) / 20 * 1e3)
logdir = f"/tmp/prof_{sys.argv[1]}"
os.system(f"rm -rf {logdir}")
tf.profiler.experimental.start(logdir)
for _ in range(10): f(arg).numpy()
tf.profiler.experimental.stop()
from tensorflow.tsl.profiler.protobuf import xplane_pb2
fn = glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)[0]
xs = xplane_pb2.XSpace(); xs.ParseFromString(open(fn, "rb").read())
tot = collections.Counter(); cnt = collections.Counter()
for plane in xs.planes:
    md = {k: v.name for k, v in plane.event_metadata.items()}
    for line in plane.lines:
        if "Steps" in line.name or "Framework" in line.name or "python" in line.name.lower(): continue
        for ev in line.events:
            name = plane.name[:10] + "|" + line.name[:12] + "|" + md.get(ev.metadata_id, "?")[-90:]
            tot[name] += ev.duration_ps / 1e6; cnt[name] += 1
for name, d in tot.most_common(45):
    print(f"{d/10/1e3:8.2f} ms/step  x{cnt[name]/10:5.1f}  {name[:110]}")
agg = collections.Counter(); aggn = collections.Counter()
for name, d in tot.items():
    if "ThunkExecutor" in name or "ExecutorState" in name or "ParallelFor" in name: continue
    base = re.sub(r"\.\d+$", "", name.split("|")[-1])
    if ":" in base: base = base.rsplit(":", 1)[1]
    agg[base] += d / 10 / 1e3; aggn[base] += cnt[name] / 10
print("TOTAL non-executor", sum(agg.values()))
for k, v in agg.most_common(30):
    print(f"{v:8.2f}  x{aggn[k]:6.1f}  {k}")
