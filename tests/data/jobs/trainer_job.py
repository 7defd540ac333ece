"""A Hugging Face Trainer script made chainable with kaggle_runner_job's two lines (docs/script.md): a one-layer
GPT-2 from scratch on made-up tokens, stopped and saved after --steps-per-session steps each session (0: only
at the deadline or on SIGTERM)."""

import argparse

import torch
from kaggle_runner_job import resume_checkpoint, segment, train_chained
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=8)
parser.add_argument("--steps-per-session", type=int, default=3)
args = parser.parse_args()


class Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, index):
        ids = torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(index))
        return {"input_ids": ids, "labels": ids}


torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16))
training = TrainingArguments(output_dir="trainer_out", max_steps=args.steps, per_device_train_batch_size=4,
                             save_steps=1000, report_to=[], use_cpu=True, logging_steps=1, seed=0, disable_tqdm=True)
trainer = Trainer(model=model, args=training, train_dataset=Tokens())
print(f"segment {segment()} resumes from {resume_checkpoint()}", flush=True)
train_chained(trainer, steps_per_session=args.steps_per_session or None)
print(f"global_step {trainer.state.global_step}", flush=True)
trainer.save_model()  # the script's own output_dir, in /kaggle/working
