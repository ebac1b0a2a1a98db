"""Profile optimizer steps 3-4 of `ft train` or finetrainers under torch.profiler (diagnosis only).
usage: python profstep.py ft|peer ... (same arguments as stepclock.py); prints the top ops by self CPU time."""
import os, runpy, sys, time
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
n = [0]; prof = [None]; t = [0, 0]
def post(o, a, k):
    n[0] += 1
    if n[0] == 2:
        prof[0] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]); prof[0].__enter__()
        t[0], t[1] = time.perf_counter(), time.process_time()
    if n[0] == 4:
        w, c = time.perf_counter() - t[0], time.process_time() - t[1]
        prof[0].__exit__(None, None, None)
        print(f"PROF 2 steps wall {w:.3f} cpu {c:.3f}", flush=True)
        print(prof[0].key_averages().table(sort_by="self_cpu_time_total", row_limit=14), flush=True)
register_optimizer_step_post_hook(post)
mode = sys.argv[1]
if mode == "ft":
    from ft.cli.main import main
    sys.argv = ["ft", *sys.argv[2:]]; main()
else:
    src = sys.argv[2]; sys.path.insert(0, src); sys.argv = [os.path.join(src, "train.py"), *sys.argv[3:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
