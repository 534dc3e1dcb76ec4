"""Training faults: NaN/Inf losses, empty batches, a crash while saving, a corrupted checkpoint."""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path

import pytest
import torch

from pixellm.reliability import checkpoint_io
from pixellm.reliability.checkpoint_io import (
    AtomicCheckpointIO,
    CheckpointError,
    load_checkpoint_file,
)
from pixellm.reliability.nonfinite import NonFiniteLossError, NonFiniteLossGuard
from pixellm.reliability.skipping import SkippedSample


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_losses_are_skipped_counted_then_fatal(bad: float) -> None:
    guard = NonFiniteLossGuard(max_skipped_steps=2)
    assert guard.should_skip(torch.tensor(1.5), step=0) is False
    with pytest.warns(UserWarning, match=rf"training loss is {bad} at step 3: step skipped \(1 of at most 2\)"):
        assert guard.should_skip(torch.tensor(bad), step=3) is True
    with pytest.warns(UserWarning, match=r"\(2 of at most 2\)"):
        assert guard.should_skip(torch.tensor(bad), step=4) is True
    with pytest.raises(NonFiniteLossError, match=rf"training loss is {bad} at step 9, after 2 skipped .*max_nonfinite_steps=2"):
        guard.should_skip(torch.tensor(bad), step=9)


def test_a_nonfinite_loss_on_another_rank_makes_every_rank_skip_and_stop_together() -> None:
    guard = NonFiniteLossGuard(max_skipped_steps=1)
    seen = []

    def other_rank_was_nan(bad: bool) -> bool:  # what all_reduce(max) gives when rank 1 had NaN
        seen.append(bad)
        return True

    with pytest.warns(UserWarning, match=r"training loss is 0.5 at step 7: step skipped \(1 of at most 1\)"):
        assert guard.should_skip(torch.tensor(0.5), step=7, any_rank=other_rank_was_nan) is True
    with pytest.raises(NonFiniteLossError, match=r"at step 8, after 1 skipped"):
        guard.should_skip(torch.tensor(0.5), step=8, any_rank=other_rank_was_nan)
    assert seen == [False, False]  # this rank's own loss was finite both times
    local_only = NonFiniteLossGuard(max_skipped_steps=1)
    assert local_only.should_skip(torch.tensor(0.5), step=7, any_rank=lambda bad: bad) is False


def test_task_skips_nan_steps_and_empty_batches(tiny_config, build, monkeypatch) -> None:
    task, data = build(tiny_config, "--model.init_args.max_nonfinite_steps=1")
    data.prepare_data()
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    empty = {"meta": [], "skipped": [SkippedSample(0, "bad")]}
    assert task.training_step(empty, 0) is None
    assert task.validation_step(empty, 0) == [] and task.predict_step(empty, 0) == []
    nan_terms = {"loss": torch.tensor(float("nan")), "ce": torch.tensor(1.0)}
    monkeypatch.setattr(task.loss, "forward", lambda ce, masks, truth: nan_terms)
    with pytest.warns(UserWarning, match="step skipped"):
        assert task.training_step(batch, 0) is None
    assert task.nonfinite.skipped == 1
    with pytest.raises(NonFiniteLossError, match="after 1 skipped"):
        task.training_step(batch, 1)


def test_a_crash_while_saving_leaves_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)
    real_save = torch.save

    def save_half_then_die(obj, handle) -> None:
        real_save(obj, handle)
        handle.truncate(handle.tell() // 2)
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_io.torch, "save", save_half_then_die)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 2}, path)
    assert os.listdir(tmp_path) == ["last.ckpt"]  # no temporary file left behind
    loaded = io.load_checkpoint(path)
    assert loaded["global_step"] == 1 and torch.equal(loaded["state_dict"]["w"], torch.ones(3))


def test_the_next_save_removes_what_a_killed_save_left(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    killed = tmp_path / ".last.ckpt.0123abcd.tmp"  # what SIGKILL leaves mid-save
    killed.write_bytes(b"half a checkpoint")
    os.utime(killed, (time.time() - 60, time.time() - 60))
    other = tmp_path / ".epoch=1.ckpt.4567ef.tmp"  # another checkpoint's: not this save's to remove
    other.write_bytes(b"")
    os.utime(other, (time.time() - 60, time.time() - 60))
    writing = tmp_path / ".last.ckpt.89abcdef.tmp"  # written after this save started: kept
    checkpoint_io.atomic_torch_save({"global_step": 3}, path)
    assert not killed.exists() and other.exists()
    writing.write_bytes(b"")
    os.utime(writing, (time.time() + 60, time.time() + 60))
    checkpoint_io.atomic_torch_save({"global_step": 4}, path)
    assert sorted(os.listdir(tmp_path)) == sorted([path.name, other.name, writing.name])
    assert torch.load(path, weights_only=True)["global_step"] == 4


class Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_corrupted_checkpoints_fail_with_the_file_name(tmp_path: Path, monkeypatch) -> None:
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.arange(1000.0)}}, good)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[:300])
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x00\xffnot a checkpoint" * 10)
    for path in (truncated, garbage):
        with pytest.raises(CheckpointError, match=rf"{path.name}: not a loadable checkpoint .*resume from an earlier"):
            load_checkpoint_file(path)
    monkeypatch.chdir(tmp_path)
    hostile = tmp_path / "hostile.ckpt"
    hostile.write_bytes(pickle.dumps({"state_dict": Payload()}, protocol=2))
    with pytest.raises(CheckpointError, match=r"hostile\.ckpt: not a loadable checkpoint"):
        AtomicCheckpointIO().load_checkpoint(hostile)
    assert not (tmp_path / "pwned").exists()  # weights_only: the payload never ran
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        load_checkpoint_file(tmp_path / "absent.ckpt")


def test_skipped_step_keeps_every_rank_in_the_all_reduce(monkeypatch) -> None:
    from types import SimpleNamespace

    from lightning import LightningModule
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from pixellm.reliability.nonfinite import skipped_step_loss

    module = LightningModule()
    module.layer = torch.nn.Linear(2, 3)
    assert skipped_step_loss(module) is None  # no trainer: one device
    monkeypatch.setattr(module, "_trainer", SimpleNamespace(world_size=1, strategy=None))
    assert skipped_step_loss(module) is None  # one device: no backward, no update
    deepspeed = DeepSpeedStrategy.__new__(DeepSpeedStrategy)  # Lightning's DeepSpeed refuses a None loss
    monkeypatch.setattr(module, "_trainer", SimpleNamespace(world_size=1, strategy=deepspeed))
    assert float(skipped_step_loss(module).detach()) == 0.0
    monkeypatch.setattr(module, "_trainer", SimpleNamespace(world_size=2, strategy=None))
    loss = skipped_step_loss(module)
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert torch.equal(module.layer.weight.grad, torch.zeros(3, 2))
    assert torch.equal(module.layer.bias.grad, torch.zeros(3))


def test_a_rank_with_an_empty_batch_joins_the_other_ranks_decision(tiny_config, build, monkeypatch) -> None:
    """Every rank enters the same collectives at every step: the non-finite decision, then the
    gradient all-reduce, whether its batch had samples or not."""
    from types import SimpleNamespace

    task, data = build(tiny_config, "--model.init_args.max_nonfinite_steps=1")
    data.prepare_data()
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    decisions = []

    def reduce_boolean_decision(bad: bool, all: bool = True) -> bool:  # another rank's loss was NaN
        decisions.append(bad)
        return True

    strategy = SimpleNamespace(reduce_boolean_decision=reduce_boolean_decision)
    monkeypatch.setattr(task, "_trainer", SimpleNamespace(world_size=2, strategy=strategy, global_step=0))
    monkeypatch.setattr(task, "log", lambda *args, **kwargs: None)
    empty = {"meta": [], "skipped": [SkippedSample(0, "bad")]}
    with pytest.warns(UserWarning, match="step skipped"):
        assert float(task.training_step(empty, 0)) == 0.0  # a zero loss: it joins the all-reduce too
    assert decisions == [False] and task.nonfinite.skipped == 1  # counted as on the other ranks
    with pytest.raises(NonFiniteLossError, match="after 1 skipped"):  # and it stops with them
        task.training_step(batch, 1)


def test_cli_names_a_truncated_ckpt_path(tmp_path: Path, tiny_config) -> None:
    from pixellm.main import main
    from pixellm.reliability.checkpoint_io import check_checkpoint_file

    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.arange(1000.0)}}, good)
    check_checkpoint_file(good)
    cut = tmp_path / "last.ckpt"
    cut.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"last\.ckpt: not a loadable checkpoint \(BadZipFile"):
        main(["validate", "--config", str(tiny_config), "--ckpt_path", str(cut)])


def test_ckpt_path_last_finds_the_newest_run_whatever_its_version_folder(tmp_path: Path, tiny_config) -> None:
    """Loggers number each run's folder (version_0, version_1, ...), where Lightning's own "last"
    looks only in the new, empty one: `pixellm validate --ckpt_path last` would score an untrained
    model and `fit --ckpt_path last` would start over."""
    from pixellm.main import main

    run = [
        "--config", str(tiny_config), "--trainer.enable_checkpointing=true",
        '--trainer.callbacks+={"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": true}}',
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path}",
        "--trainer.logger.name=", f"--trainer.default_root_dir={tmp_path}",
    ]
    with pytest.raises(FileNotFoundError, match=rf"--ckpt_path last: no checkpoint of an earlier run matches {tmp_path}/\*\*/checkpoints/last\*\.ckpt"):
        main(["validate", *run, "--ckpt_path", "last"])
    trained = main(["fit", *run, "--trainer.max_steps=2", "--trainer.val_check_interval=2"]).model
    assert (tmp_path / "version_0" / "checkpoints" / "last.ckpt").is_file()
    resumed = main(["fit", *run, "--trainer.max_steps=3", "--trainer.val_check_interval=3", "--ckpt_path", "last"])
    assert resumed.trainer.global_step == 3 and (tmp_path / "version_1" / "checkpoints" / "last.ckpt").is_file()
    validated = main(["validate", *run, "--ckpt_path", "last"])  # version_1's, the newest
    assert validated.trainer.ckpt_path == str(tmp_path / "version_1" / "checkpoints" / "last.ckpt")
    assert not torch.equal(validated.model.decoder.iou_token.weight, trained.decoder.iou_token.weight)
    assert torch.equal(validated.model.decoder.iou_token.weight, resumed.model.decoder.iou_token.weight)


def test_last_checkpoint_places_follow_lightnings_defaults(tmp_path: Path) -> None:
    import time

    from jsonargparse import Namespace

    from pixellm.reliability.checkpoint_io import find_last_checkpoint

    config = Namespace({"trainer.default_root_dir": str(tmp_path), "trainer.logger": None, "trainer.callbacks": None})
    assert find_last_checkpoint(config) is None
    for version in (0, 1):  # the default logger's folders; the newest file wins
        folder = tmp_path / "lightning_logs" / f"version_{version}" / "checkpoints"
        folder.mkdir(parents=True)
        (folder / "last.ckpt").write_bytes(b"x")
        time.sleep(0.01)
    (tmp_path / "elsewhere" / "checkpoints").mkdir(parents=True)  # not a place a run of this config writes
    (tmp_path / "elsewhere" / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert find_last_checkpoint(config) == tmp_path / "lightning_logs" / "version_1" / "checkpoints" / "last.ckpt"
