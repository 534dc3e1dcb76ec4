"""Kill a tiny CPU training run with SIGKILL at a random step, resume it with ckpt_path="last": the
final weights, optimizer state and learning rate equal those of an uninterrupted run, bit for bit
(dropout included: every batch's draws are seeded by (seed, epoch, batch, process))."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pixellm.main import main

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "conf" / "tiny.yaml"
MAX_STEPS = 8  # 3 batches per epoch below: the run crosses two epoch boundaries
STEP_FILE = re.compile(r"^step=(\d+)\.ckpt$")


def fit_args(checkpoints: Path, *extra: str) -> list[str]:
    """A tiny run with LoRA dropout that checkpoints every step atomically, with warm-up + linear decay of the LR."""
    return [
        "fit",
        "--config", str(TINY),
        f"--trainer.max_steps={MAX_STEPS}",
        "--trainer.limit_val_batches=0",
        "--trainer.enable_model_summary=false",
        "--trainer.enable_checkpointing=true",
        f"--trainer.default_root_dir={checkpoints}",
        "--trainer.plugins=pixellm.reliability.checkpoint_io.AtomicCheckpointIO",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        f"--trainer.callbacks.dirpath={checkpoints}",
        "--trainer.callbacks.every_n_train_steps=1",
        "--trainer.callbacks.save_top_k=1",
        "--trainer.callbacks.save_last=true",
        "--trainer.callbacks.filename={step}",
        "--model.init_args.scheduler=pixellm.schedule.WarmupLinearLR",
        "--model.init_args.scheduler.warmup_steps=3",
        "--data.init_args.num_train_images=6",
        # LoRA with dropout (as the paper's configs): its masks must not repeat the run's first ones after a resume
        "--model.init_args.lmm.init_args.lora.r=4",
        "--model.init_args.lmm.init_args.lora.alpha=8",
        "--model.init_args.lmm.init_args.lora.dropout=0.3",
        *extra,
    ]


def fit_in_process(args: list[str]) -> tuple[dict[str, torch.Tensor], dict, float]:
    """Run ``pixellm`` here on one thread; return the final weights, optimizer state and LR."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cli = main(args)
    finally:
        torch.set_num_threads(threads)
    optimizer = cli.trainer.optimizers[0]
    return cli.model.state_dict(), optimizer.state_dict()["state"], optimizer.param_groups[0]["lr"]


def latest_step(folder: Path) -> int:
    steps = [int(m.group(1)) for name in os.listdir(folder) if (m := STEP_FILE.match(name))]
    return max(steps, default=0)


@pytest.mark.slow
def test_sigkill_then_resume_from_last_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    killed_dir, reference_dir = tmp_path / "killed", tmp_path / "reference"
    kill_after = int(os.environ.get("KILL_AFTER", 0)) or random.randint(1, MAX_STEPS - 2)
    print(f"SIGKILL once step {kill_after} is checkpointed")
    # the child SIGKILLs itself as soon as last.ckpt of step kill_after is on disk (a poll from here
    # could miss that moment: tiny steps are milliseconds)
    script = (
        "import os, signal, sys, torch; torch.set_num_threads(1)\n"
        "from pixellm.reliability import checkpoint_io\n"
        "save = checkpoint_io.atomic_torch_save\n"
        "def save_then_die(obj, path):\n"
        "    save(obj, path)\n"
        f"    if str(path).endswith('last.ckpt') and obj.get('global_step', 0) >= {kill_after}:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "checkpoint_io.atomic_torch_save = save_then_die\n"
        "from pixellm.main import main\n"
        "main(sys.argv[1:])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    child = subprocess.run(
        [sys.executable, "-c", script, *fit_args(killed_dir)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300, check=False,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-2000:]
    interrupted_at = latest_step(killed_dir)
    assert interrupted_at == kill_after

    reference = fit_in_process(fit_args(reference_dir))
    weights, optimizer, lr = fit_in_process(fit_args(killed_dir, "--ckpt_path=last"))

    ref_weights, ref_optimizer, ref_lr = reference
    assert lr == ref_lr == 0.0  # the linear decay reached 0 at MAX_STEPS in both runs
    assert weights.keys() == ref_weights.keys()
    differing = [k for k in weights if not torch.equal(weights[k], ref_weights[k])]
    assert differing == [], f"killed after step {interrupted_at}: {differing[:5]}"
    for index, state in ref_optimizer.items():
        assert int(optimizer[index]["step"]) == int(state["step"]) == MAX_STEPS
        assert torch.equal(optimizer[index]["exp_avg"], state["exp_avg"])
        assert torch.equal(optimizer[index]["exp_avg_sq"], state["exp_avg_sq"])
