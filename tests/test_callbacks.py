"""`pixellm test` / `validate` with the EvaluationReport callback: results JSON, the table, overlays."""

from __future__ import annotations

import json

import pytest
import torch

from pixellm.main import main


def report_callback(folder) -> str:
    return json.dumps({"class_path": "pixellm.callbacks.EvaluationReport", "init_args": {"output_dir": str(folder)}})


def test_pixellm_test_teacher_forced_writes_json_and_prints_the_table(tiny_config, tmp_path, capsys):
    cli = main(
        ["test", "--config", str(tiny_config), f"--trainer.callbacks+={report_callback(tmp_path / 'eval')}",
         f"--trainer.default_root_dir={tmp_path}"]
    )
    printed = capsys.readouterr().out
    assert "| Method |" in printed and "| PixelLM (this run) |" in printed
    saved = json.loads((tmp_path / "eval" / "test_step0" / "test.json").read_text())
    assert saved["mode"] == "teacher_forced" and saved["judge"] == "none"
    questions = saved["questions"]
    assert saved["num_questions"] == len(questions) > 0
    assert all(len(q["pairs"]) == q["num_targets"] for q in questions)  # text order: one pair per target
    # the callback's scores are the task's logged scores (same pairs, weight 1)
    metrics = cli.trainer.callback_metrics
    assert saved["scores"]["gIoU"] == pytest.approx(float(metrics["test/gIoU"]), abs=1e-6)
    assert saved["scores"]["cIoU"] == pytest.approx(float(metrics["test/cIoU"]), abs=1e-6)
    table = (tmp_path / "eval" / "test_step0" / "table.md").read_text()
    assert f"{100 * saved['scores']['gIoU']:.1f}" in table.splitlines()[2]


def test_pixellm_validate_generate_mode_matches_judges_and_logs_overlays(tiny_config, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cli = main(
        ["validate", "--config", str(tiny_config), f"--trainer.callbacks+={report_callback(tmp_path / 'eval')}",
         "--data.init_args.eval_mode", "generate", "--model.init_args.max_new_tokens=8",
         "--trainer.logger=lightning.pytorch.loggers.TensorBoardLogger", f"--trainer.logger.save_dir={tmp_path}",
         f"--trainer.default_root_dir={tmp_path}"]
    )
    printed = capsys.readouterr().out
    assert "Generated answers scored by: IoU-only." in printed
    saved = json.loads((tmp_path / "eval" / "val_step0" / "val.json").read_text())
    assert saved["mode"] == "generate" and saved["judge"] == "IoU-only"
    for question in saved["questions"]:
        predictions = {p["pred"] for p in question["pairs"] if p["pred"] >= 0}
        assert len(question["pairs"]) == max(len(predictions), question["num_targets"])
        assert "[SEG" not in question["rewritten_answer"]  # every mask reference rewritten
        assert question["judge_scores"] == [10 if any(p["pred"] == k and p["gt"] >= 0 for p in question["pairs"]) else 0
                                            for k in range(len(predictions))]
    # the logged scores are the IoU-only report's (unmatched pairs 0 in both)
    metrics = cli.trainer.callback_metrics
    assert saved["scores"]["gIoU"] == pytest.approx(float(metrics["val/gIoU"]), abs=1e-6)
    assert saved["scores"]["cIoU"] == pytest.approx(float(metrics["val/cIoU"]), abs=1e-6)
    events = EventAccumulator(str(cli.trainer.logger.log_dir), size_guidance={"images": 0})
    events.Reload()
    overlays = [tag for tag in events.Tags()["images"] if tag.startswith("val/overlay_")]
    assert len(overlays) == 4
    image = events.Images(overlays[0])[0]
    assert image.width == 32 and image.height == 32  # the shapes image at its original size


def test_overlay_tints_prediction_red_and_truth_green():
    from pixellm.evaluation.overlay import mask_overlay, unnormalise

    pixels = torch.zeros(3, 4, 4)  # normalised 0 -> the mean colour
    image = unnormalise(pixels, (2, 2), (4, 4), mean=(127.5, 127.5, 127.5), std=(1.0, 1.0, 1.0))
    assert image.shape == (3, 4, 4) and torch.allclose(image, torch.full_like(image, 0.5))
    predicted = torch.zeros(1, 4, 4, dtype=torch.bool)
    predicted[0, 0, 0] = True
    truth = torch.zeros(1, 4, 4, dtype=torch.long)
    truth[0, 0, 0] = truth[0, 3, 3] = 1
    out = mask_overlay(image, predicted, truth)
    assert out[:, 1, 1].tolist() == [0.5, 0.5, 0.5]  # untouched
    assert out[:, 3, 3].tolist() == pytest.approx([0.325, 0.7, 0.325])  # green only
    assert out[0, 0, 0] > out[2, 0, 0] and out[1, 0, 0] > out[2, 0, 0]  # red + green = yellow


def test_generate_mode_matches_shuffled_perfect_masks_and_rewrites_with_descriptions(
    tiny_config, tmp_path, capsys, monkeypatch
):
    """Generation replaced by the ground truth in reverse order: matching must undo the order."""
    from pixellm.task import Generation, PixelLMTask

    def perfect_reversed(self, batch):
        group = " ".join(self.codebook.tokens)
        answers = [" and ".join([f"it {group}"] * m.shape[0]) for m in batch["masks"]]
        logits = [(2 * m - 1).flip(0) for m in batch["masks"]]  # (K, H, W): +1 on the mask, reversed
        return Generation(answers, logits, torch.zeros(len(answers), dtype=torch.long))

    monkeypatch.setattr(PixelLMTask, "generate_answers", perfect_reversed)
    cli = main(
        ["test", "--config", str(tiny_config), f"--trainer.callbacks+={report_callback(tmp_path / 'eval')}",
         "--data.init_args.eval_mode", "generate", f"--trainer.default_root_dir={tmp_path}"]
    )
    assert float(cli.trainer.callback_metrics["test/gIoU"]) == pytest.approx(1.0, abs=1e-4)
    assert float(cli.trainer.callback_metrics["test/cIoU"]) == pytest.approx(1.0, abs=1e-6)
    saved = json.loads((tmp_path / "eval" / "test_step0" / "test.json").read_text())
    assert saved["scores"]["gIoU"] == pytest.approx(1.0, abs=1e-4)
    dataset = cli.datamodule.test_set
    for index, question in enumerate(saved["questions"]):
        targets = dataset[index].meta["targets"]
        k = len(targets)
        assert [(p["pred"], p["gt"]) for p in question["pairs"]] == [(i, k - 1 - i) for i in range(k)]
        assert question["judge_scores"] == [10] * k
        assert question["rewritten_answer"].count("(") == k
        if k:  # prediction 0 is the last target
            assert question["rewritten_answer"].startswith(f"it ({targets[-1]['description']} [")
    assert "| PixelLM (this run) | " in capsys.readouterr().out


def test_a_judges_scores_are_logged_beside_the_iou_only_ones(tiny_config, tmp_path, monkeypatch):
    """Each matched target judged 5 of 10: the judged gIoU / cIoU are half the IoU-only ones (perfect masks)."""
    from pixellm.callbacks import EvaluationReport
    from pixellm.evaluation.judge import AnswerJudge, Judgement
    from pixellm.main import lightning_cli
    from pixellm.task import Generation, PixelLMTask

    class HalfJudge(AnswerJudge):
        label = "half"

        def judge(self, question, rewritten_answer, matched):
            return Judgement(scores=[5 if m else 0 for m in matched])

    def perfect(self, batch):
        answers = [" and ".join([" ".join(self.codebook.tokens)] * m.shape[0]) for m in batch["masks"]]
        return Generation(answers, [2.0 * m - 1 for m in batch["masks"]], torch.zeros(len(answers), dtype=torch.long))

    monkeypatch.setattr(PixelLMTask, "generate_answers", perfect)
    cli = lightning_cli(["--config", str(tiny_config), "--data.init_args.eval_mode", "generate",
                         f"--trainer.default_root_dir={tmp_path}"], run=False)
    cli.trainer.callbacks.append(EvaluationReport(judge=HalfJudge(), output_dir=str(tmp_path / "eval")))
    cli.trainer.test(cli.model, cli.datamodule)
    metrics = cli.trainer.callback_metrics
    saved = json.loads((tmp_path / "eval" / "test_step0" / "test.json").read_text())
    assert float(metrics["test/judged_gIoU"]) == pytest.approx(saved["scores"]["gIoU"], abs=1e-6)
    assert float(metrics["test/judged_cIoU"]) == pytest.approx(saved["scores"]["cIoU"], abs=1e-6)
    assert saved["scores"]["gIoU"] == pytest.approx(0.5 * float(metrics["test/gIoU"]), abs=1e-4)
    assert float(metrics["test/gIoU"]) == pytest.approx(1.0, abs=1e-4)
