"""A plain PyTorch loop that keeps kaggle-runner's job contract by hand (docs/script.md): its whole state in
KAGGLE_RUNNER_CHECKPOINT_DIR, exit 75 after --steps-per-session steps, resumed from KAGGLE_RUNNER_RESUME_DIR,
exit 0 with model.pt once --steps are done. Deterministic on the CPU, so a chain can be compared bit for bit."""

import argparse
import os
import sys
from pathlib import Path

import torch

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, required=True)
parser.add_argument("--steps-per-session", type=int, default=0)
args = parser.parse_args()

torch.manual_seed(0)
torch.set_num_threads(1)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
data = torch.randn(512, 16)
target = data.sum(dim=1, keepdim=True).sin()
step = 0
resume = os.environ.get("KAGGLE_RUNNER_RESUME_DIR")
if resume:
    state = torch.load(Path(resume) / "state.pt", weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    step = state["step"]
    print(f"resumed at step {step} from {resume}", flush=True)

session = 0
while step < args.steps:
    batch = torch.randint(0, 512, (64,))
    loss = torch.nn.functional.mse_loss(model(data[batch]), target[batch])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    step, session = step + 1, session + 1
    if step < args.steps and session == args.steps_per_session:
        out = Path(os.environ["KAGGLE_RUNNER_CHECKPOINT_DIR"]) / "state.pt"
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
                    "step": step}, out)
        print(f"saved at step {step} in segment {os.environ['KAGGLE_RUNNER_SEGMENT']}", flush=True)
        sys.exit(75)

torch.save(model.state_dict(), "model.pt")
print(f"finished at step {step}", flush=True)
