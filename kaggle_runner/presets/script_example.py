"""An example script kaggle-runner can chain (docs/script.md): a small PyTorch regression that saves its whole
state in KAGGLE_RUNNER_CHECKPOINT_DIR, exits 75 to be resumed in a new session, and 0 when it is done.

    python train.py --steps 60 --steps-per-session 20     # runs here too, as one session
"""

import argparse
import os
import sys
from pathlib import Path

import torch
from kaggle_runner_job import EXIT_RESUME, checkpoint_dir, deadline_reached, resume_dir

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=60)
parser.add_argument("--steps-per-session", type=int, default=0, help="stop and ask to be resumed after these")
args = parser.parse_args()

torch.manual_seed(0)
model = torch.nn.Linear(8, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
inputs, targets = torch.randn(256, 8), torch.randn(256, 1)
step = 0
if resume_dir() is not None:  # a new session of the chain: pick up exactly where the last one saved
    state = torch.load(resume_dir() / "state.pt", weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    step = state["step"]
    print(f"resumed at step {step}", flush=True)

session_steps = 0
while step < args.steps:
    batch = torch.randint(0, 256, (32,))
    loss = torch.nn.functional.mse_loss(model(inputs[batch]), targets[batch])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    step += 1
    session_steps += 1
    if step % 10 == 0:
        print(f"step {step} loss {loss.item():.4f}", flush=True)
    if step < args.steps and (deadline_reached() or session_steps == args.steps_per_session):
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
                    "step": step}, checkpoint_dir() / "state.pt")
        print(f"saved at step {step}; asking for a new session", flush=True)
        sys.exit(EXIT_RESUME)

torch.save(model.state_dict(), Path(os.getcwd()) / "model.pt")  # an output: what fetch brings home
print(f"done at step {step}", flush=True)
