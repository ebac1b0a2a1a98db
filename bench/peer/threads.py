"""Per-thread CPU time and context switches over optimizer steps [A, B) of `ft train` or finetrainers (diagnosis).

    python threads.py ft|peer ... (the arguments of stepclock.py); env TH_A, TH_B (default 6, 16)

Prints wall and CPU per step, the cores kept busy, and per thread (from /proc/self/task/*/stat and status): CPU
per step, voluntary switches per step (the thread went to sleep: a futex wait, an OpenMP worker parked between
parallel regions) and involuntary ones (preempted by another runnable thread). An OpenMP worker with about as
many voluntary switches per step as the step has parallel regions is sleeping between them, not spinning."""
import os, runpy, sys, time, json
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

A, B = int(os.environ.get("TH_A", 6)), int(os.environ.get("TH_B", 16))
n = [0]
snap = {}
TCK = os.sysconf("SC_CLK_TCK")


def threads():
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            stat = open(f"/proc/self/task/{tid}/stat").read()
            comm = stat[stat.index("(") + 1:stat.rindex(")")]
            f = stat[stat.rindex(")") + 2:].split()
            cpu = (int(f[11]) + int(f[12])) / TCK
            st = open(f"/proc/self/task/{tid}/status").read().splitlines()
            v = int(next(x for x in st if x.startswith("voluntary_ctxt")).split()[1])
            nv = int(next(x for x in st if x.startswith("nonvoluntary_ctxt")).split()[1])
            out[tid] = (comm, cpu, v, nv)
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            pass
    return out


def post(o, a, k):
    n[0] += 1
    if n[0] == A:
        snap["t"], snap["c"], snap["th"] = time.perf_counter(), time.process_time(), threads()
    if n[0] == B:
        w, c = time.perf_counter() - snap["t"], time.process_time() - snap["c"]
        now = threads()
        steps = B - A
        print(f"THREADS steps {A}-{B}: wall/step {1000*w/steps:.1f} ms cpu/step {1000*c/steps:.1f} ms "
              f"busy {c/w:.2f} cores; torch threads {torch.get_num_threads()} interop {torch.get_num_interop_threads()}"
              f" load {os.getloadavg()[0]:.2f}", flush=True)
        for tid, (comm, cpu, v, nv) in sorted(now.items(), key=lambda x: -x[1][1]):
            c0, v0, nv0 = snap["th"].get(tid, (comm, 0, 0, 0))[1:]
            if cpu - c0 > 0 or v - v0 > 0:
                print(f"  tid {tid} {comm:16s} cpu/step {1000*(cpu-c0)/steps:7.1f} ms  vol/step {(v-v0)/steps:8.1f}"
                      f"  invol/step {(nv-nv0)/steps:6.1f}", flush=True)


register_optimizer_step_post_hook(post)
mode = sys.argv[1]
if mode == "ft":
    from ft.cli.main import main
    sys.argv = ["ft", *sys.argv[2:]]
    main()
else:
    src = sys.argv[2]; sys.path.insert(0, src); sys.argv = [os.path.join(src, "train.py"), *sys.argv[3:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
