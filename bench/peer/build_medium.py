"""The medium CogVideoX of ft's bench/train_step.py (4 layers of width 512, 16 latent channels, a 4-layer T5 of
width 512, max_text_seq_length 226) and 6 clips of 17x128x192, built with ft's own code into PEER_ROOT/work/medium.
Run with ft's venv: PEER_ROOT/ft/.venv/bin/python build_medium.py"""
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, "PEER_ROOT/ft/bench")
from train_step import build_medium  # noqa: E402

from ft.cli.synthetic import make_shapes_dataset  # noqa: E402

w = Path("PEER_ROOT/work/medium")
if not (w / "model/model_index.json").is_file():
    build_medium(w / "model")
if not (w / "data/videos.txt").is_file():
    make_shapes_dataset(w / "data", num_clips=6, frames=17, sizes=((128, 192),), num_images=0, seed=0)
# transformers 4.x (finetrainers' env) reads this T5 tokenizer folder once extra_special_tokens is a dict
shutil.rmtree(w / "tokenizer_tf4", ignore_errors=True)
shutil.copytree(w / "model/tokenizer", w / "tokenizer_tf4")
c = json.loads((w / "tokenizer_tf4/tokenizer_config.json").read_text())
c["extra_special_tokens"] = {}
(w / "tokenizer_tf4/tokenizer_config.json").write_text(json.dumps(c, indent=2))
(w / "training.json").write_text(json.dumps({"datasets": [{
    "data_root": str(w / "data"), "dataset_type": "video", "video_resolution_buckets": [[17, 128, 192]],
    "reshape_mode": "bicubic"}]}, indent=2))
print("ok", w)
