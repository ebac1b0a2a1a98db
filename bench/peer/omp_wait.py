"""The OpenMP wait behind ft's idle core share, in isolation: fwd+bwd of the medium CogVideoX transformer (as
fwdbwd.py) in the main thread, alone or beside a second thread that once ran one parallel torch op (a second
OpenMP team: what ft's reader thread did with torch.stack until the fix).

    PEER_ROOT/ft/.venv/bin/python omp_wait.py MODEL_DIR [side]        (env: GOMP_SPINCOUNT, OMP_WAIT_POLICY)

With more OpenMP threads than cores, GNU OpenMP waits with a spin count of 1000 instead of 300000 (about 3 ms):
idle workers sleep at once, and every parallel region wakes them through the kernel. On a quiet machine that is
idle core share (slower); on an oversubscribed one it avoids spinning on a core another process needs (faster).
Prints the median wall and CPU time of 5 iterations after 2 warm-ups, and the load average."""
import os
import statistics as st
import sys
import threading
import time

import torch
from diffusers import CogVideoXTransformer3DModel
from diffusers.models.embeddings import get_3d_rotary_pos_embed

m = CogVideoXTransformer3DModel.from_pretrained(sys.argv[1], subfolder="transformer")
m.requires_grad_(False)
for name, module in m.named_modules():
    if name.endswith("attn1.to_q"):
        module.weight.requires_grad_(True)
torch.manual_seed(0)
x, e, t = torch.randn(1, 5, 16, 16, 24), torch.randn(1, 226, 512), torch.tensor([500])
rope = get_3d_rotary_pos_embed(64, ((0, 0), (8, 12)), (8, 12), 5, device="cpu")
release = threading.Event()
side = len(sys.argv) > 2 and sys.argv[2] == "side"
if side:
    threading.Thread(target=lambda: (torch.stack([torch.randn(226, 512)]), release.wait()), daemon=True).start()
    time.sleep(0.1)
runs = []
for _ in range(7):
    t0, c0 = time.perf_counter(), time.process_time()
    y = m(hidden_states=x, encoder_hidden_states=e, timestep=t, image_rotary_emb=rope, return_dict=False)[0]
    y.float().pow(2).mean().backward()
    runs.append((time.perf_counter() - t0, time.process_time() - c0))
wall, cpu = st.median(a for a, _ in runs[2:]), st.median(b for _, b in runs[2:])
label = (f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT', '-')} OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '-')}"
         + (" + second team" if side else ""))
print(f"{label:55s} wall {1000 * wall:7.1f} ms  cpu {1000 * cpu:7.1f} ms  busy {cpu / wall:.2f} cores  "
      f"load {os.getloadavg()[0]:.1f}", flush=True)
release.set()
