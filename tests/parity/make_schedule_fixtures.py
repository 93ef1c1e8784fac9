"""Learning-rate schedules from transformers' `get_scheduler`, step by step, for the Rust test
`tests/schedules.rs`. Writes tests/fixtures/schedules.json. Re-run from the repository root:

    python tests/parity/make_schedule_fixtures.py
"""

import json
from pathlib import Path

import torch
import transformers
from transformers import get_scheduler

OUT = Path(__file__).resolve().parent.parent / "fixtures" / "schedules.json"

CASES = [
    ("linear", 3e-4, 10, 50, {}),
    ("linear", 1e-3, 0, 17, {}),
    ("cosine", 5e-5, 7, 40, {}),
    ("cosine", 2e-4, 5, 30, {"num_cycles": 1.5}),
    ("cosine_with_restarts", 1e-3, 4, 40, {"num_cycles": 3}),
    ("polynomial", 1e-3, 5, 30, {}),
    ("polynomial", 1e-3, 0, 25, {"lr_end": 1e-5, "power": 2.0}),
    ("constant", 4e-4, 0, 20, {}),
    ("constant_with_warmup", 4e-4, 6, 20, {}),
    ("inverse_sqrt", 1e-3, 8, 40, {}),
    ("inverse_sqrt", 1e-3, 4, 40, {"timescale": 20}),
    ("cosine_with_min_lr", 1e-3, 5, 40, {"min_lr": 1e-4}),
    ("cosine_with_min_lr", 1e-3, 5, 40, {"min_lr_rate": 0.05}),
    ("warmup_stable_decay", 1e-3, 5, 40, {"num_decay_steps": 10}),
    ("warmup_stable_decay", 1e-3, 6, 40, {"num_decay_steps": 12, "num_stable_steps": 10, "warmup_type": "cosine", "decay_type": "1-sqrt", "min_lr_ratio": 0.1}),
    ("warmup_stable_decay", 1e-3, 4, 30, {"num_decay_steps": 8, "warmup_type": "1-sqrt", "decay_type": "linear"}),
]


def main():
    out = []
    for name, lr, warmup, total, kwargs in CASES:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
        sched = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total, scheduler_specific_kwargs=dict(kwargs))
        lrs = []
        for _ in range(total + 5):  # a few steps past the end
            lrs.append(opt.param_groups[0]["lr"])  # the rate the next optimizer step uses
            opt.step()
            sched.step()
        out.append({"name": name, "learning_rate": lr, "warmup_steps": warmup, "max_steps": total, "kwargs": kwargs, "lrs": lrs})
    OUT.write_text(json.dumps({"transformers": transformers.__version__, "cases": out}, indent=1) + "\n")
    print(f"wrote {len(out)} schedules to {OUT}")


if __name__ == "__main__":
    main()
