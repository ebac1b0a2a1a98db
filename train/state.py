"""The training state as one object: step, data position, trainable weights, optimizer, LR schedule and RNG.

`state_dict()` gives two parts: `tensors` (weights and optimizer state, keyed by parameter names through
torch.distributed.checkpoint.state_dict, the form DCP saves and reshards) and `extra` (plain JSON: step, data
position, LR schedule, and the torch, CUDA, Python and NumPy RNG states; CUDA's is optional, so a checkpoint
moves between CPU and GPU machines). `load_state_dict()` puts both back, so a run stopped at step N
and resumed continues exactly as the straight run would.
"""

from __future__ import annotations

import base64
import random
from typing import Any


class TrainState:
    def __init__(self, model: Any, optimizer: Any, lr_schedule: Any):
        self.model, self.optimizer, self.lr_schedule = model, optimizer, lr_schedule
        self.step = 0
        self.data_position: dict[str, Any] | None = None

    def _options(self, strict: bool = True) -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        # frozen weights (a LoRA's base) are not part of the state: they come from --pretrained. Loading is not
        # strict about them; DCP has already refused a checkpoint that lacks any trainable weight.
        return StateDictOptions(ignore_frozen_params=True, strict=strict)

    def tensor_state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(self.model, self.optimizer, options=self._options())
        return {"model": model_state, "optimizer": optimizer_state}

    def extra_state(self) -> dict[str, Any]:
        import numpy as np
        import torch

        version, internal, gauss = random.getstate()
        np_state = np.random.get_state()
        rng = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
               "python": [version, list(internal), gauss],
               "numpy": [np_state[0], np_state[1].tolist(), *map(float, np_state[2:])]}
        if torch.cuda.is_available():  # optional: a checkpoint moves between CPU and GPU machines
            rng["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
        return {"step": self.step, "data_position": self.data_position,
                "lr_schedule": self.lr_schedule.state_dict(), "rng": rng}

    def state_dict(self) -> dict[str, Any]:
        return {"tensors": self.tensor_state(), "extra": self.extra_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        import numpy as np
        import torch
        from torch.distributed.checkpoint.state_dict import set_state_dict

        tensors, extra = state["tensors"], state["extra"]
        set_state_dict(self.model, self.optimizer, model_state_dict=tensors["model"],
                       optim_state_dict=tensors["optimizer"], options=self._options(strict=False))
        rng = extra["rng"]

        def byte_tensor(text: str) -> Any:
            return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)

        torch.set_rng_state(byte_tensor(rng["torch"]))
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(byte_tensor(rng["cuda"]))
        self.lr_schedule.load_state_dict(extra["lr_schedule"])
        version, internal, gauss = rng["python"]
        random.setstate((version, tuple(internal), gauss))
        name, keys, pos, has_gauss, cached = rng["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), int(pos), int(has_gauss), cached))
        self.step, self.data_position = int(extra["step"]), extra["data_position"]
