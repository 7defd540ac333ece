"""Two training processes (DistributedDataParallel over gloo, as over NCCL on Kaggle's two T4s), on the CPU."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch

from tests.kernel_helpers import attach_checkpoint, render, run_kernel

pytestmark = pytest.mark.slow


def test_two_processes_share_each_step_and_only_rank_zero_writes(tmp_path):
    """Two T4s' path: fp16 autocast with a GradScaler in each process, gradients all-reduced by DDP."""
    run = run_kernel(render(tmp_path, ["world_size=2", "max_steps=12", "eval_steps=6", 'precision="fp16"']),
                     tmp_path / "w")
    assert run.returncode == 0, run.stdout[-3000:]
    assert "precision float16" in run.stdout
    assert "Starting 2 training processes" in run.stdout
    assert len(run.events("end")) == 1 and len(run.events("start")) == 1  # one voice in the log
    assert len(run.events("session")) == 1
    assert run.events("start")[0]["world_size"] == 2
    state = run.run_state()
    assert state["status"] == "complete" and state["global_step"] == 12
    checkpoint = torch.load(run.working / state["newest_checkpoint"], weights_only=True)
    # Each rank takes half of every step's 8 x 2 windows: the effective batch is the config's.
    assert checkpoint["world_size"] * checkpoint["micro_batch_size"] * checkpoint["accumulation"] == 16
    assert checkpoint["scaler"]["scale"] > 0
    history = [h for h in json.loads((run.working / "training_history.json").read_text()) if h["kind"] == "eval"]
    assert [h["step"] for h in history] == [6, 12] and history[-1]["val_loss"] < history[0]["val_loss"]
    assert (run.working / "final_model/config.json").exists()
    assert not [p for p in run.working.rglob("*.tmp")]


def test_checkpoints_move_between_two_processes_and_one(tmp_path):
    """Also the chain's two mount layouts: <input>/<slug>/ and <input>/datasets/<owner>/<slug>/."""
    first = run_kernel(render(tmp_path / "a", ["world_size=2", "segment_steps=8"]), tmp_path / "first")
    assert first.run_state()["reason"] == "step_budget" and first.run_state()["global_step"] == 8, \
        first.stdout[-2000:]
    chain = attach_checkpoint(first.working, tmp_path / "in1", layout="legacy")
    second = run_kernel(render(tmp_path / "b", ["world_size=1", "segment_steps=8"], chain), tmp_path / "second",
                        input_dir=tmp_path / "in1")
    start = second.events("start")[0]
    assert start["global_step"] == 8 and start["world_size"] == 1 and start["resumed_from"]["global_step"] == 8
    assert second.run_state()["global_step"] == 16, second.stdout[-2000:]
    chain = attach_checkpoint(second.working, tmp_path / "in2", layout="datasets")
    third = run_kernel(render(tmp_path / "c", ["world_size=2"], chain), tmp_path / "third",
                       input_dir=tmp_path / "in2")
    assert third.returncode == 0, third.stdout[-2000:]
    assert third.events("start")[0]["global_step"] == 16 and len(third.events("session")) == 1
    assert third.run_state()["status"] == "complete" and third.run_state()["global_step"] == 24
    assert third.run_state()["resumed_from"]["file"] == "checkpoint_epoch1_step16.pt"


def test_uneven_share_is_refused_clearly(tmp_path):
    run = run_kernel(render(tmp_path, ["world_size=3"]), tmp_path / "w")
    assert run.returncode == 1
    assert "cannot be shared evenly by 3 processes" in run.run_state()["message"]


def test_the_same_script_under_torchrun_and_its_checkpoint_in_one_process(tmp_path):
    """torchrun starts the ranks (RANK/WORLD_SIZE/LOCAL_RANK set): the kernel starts none of its own and joins
    the process group from the environment; its checkpoint resumes in a plain one-process run, whose checkpoint
    resumes under torchrun again, this time with a rendezvous as multi-node runs use (--nnodes, c10d)."""
    inputs = tmp_path / "in"
    corpus = inputs / "corpus"  # a small corpus: parsing the whole standard library twice would double the time
    corpus.mkdir(parents=True)
    for name in ("argparse", "inspect", "typing"):
        (corpus / f"{name}.txt").write_text((Path(os.__file__).parent / f"{name}.py").read_text())
    data = ['dataset="text-files"', 'text_files_path="corpus"', "max_steps=16"]
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    first = run_kernel(render(tmp_path / "a", [*data, "segment_steps=8"]), tmp_path / "first", input_dir=inputs,
                       launcher=torchrun)
    assert first.returncode == 0, first.stdout[-3000:]
    assert "Rank 0 of 2 started by torchrun" in first.stdout and "Starting 2 training processes" not in first.stdout
    assert len(first.events("session")) == 1 and len(first.events("end")) == 1  # rank 0 alone speaks
    assert first.events("start")[0]["world_size"] == 2
    state = first.run_state()
    assert state["reason"] == "step_budget" and state["global_step"] == 8
    assert torch.load(first.working / state["newest_checkpoint"], weights_only=True)["world_size"] == 2
    chain = attach_checkpoint(first.working, inputs, layout="datasets")
    second = run_kernel(render(tmp_path / "b", [*data, "world_size=1", "segment_steps=4"], chain),
                        tmp_path / "second", input_dir=inputs)
    assert second.returncode == 0, second.stdout[-2000:]
    start = second.events("start")[0]
    assert start["global_step"] == 8 and start["world_size"] == 1 and start["resumed_from"]["global_step"] == 8
    assert second.run_state()["reason"] == "step_budget" and second.run_state()["global_step"] == 12
    chain = attach_checkpoint(second.working, tmp_path / "in2", layout="datasets")
    shutil.copytree(corpus, tmp_path / "in2" / "corpus")
    with socket.socket() as probe:  # a free port for the rendezvous endpoint
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    rendezvous = ["-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2", "--rdzv_backend=c10d",
                  f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=kernel-test"]
    third = run_kernel(render(tmp_path / "c", data, chain), tmp_path / "third", input_dir=tmp_path / "in2",
                       launcher=rendezvous)
    assert third.returncode == 0, third.stdout[-3000:]
    start = third.events("start")[0]
    assert start["global_step"] == 12 and start["world_size"] == 2 and start["resumed_from"]["global_step"] == 12
    assert third.run_state()["status"] == "complete" and third.run_state()["global_step"] == 16
    history = json.loads((third.working / "training_history.json").read_text())
    assert {h["segment"] for h in history if h["kind"] != "sample"} == {1, 2, 3}
