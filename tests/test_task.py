"""PixelLMTask on the tiny config: it learns, it generates, it refuses misaligned data."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pixellm.data.splits import EvalSplit


@pytest.fixture(scope="module")
def task_and_batch(tiny_config, build):
    torch.manual_seed(0)
    task, data = build(tiny_config)
    data.prepare_data()
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    return task, data, batch


def test_thirty_steps_on_one_batch_halve_the_mask_loss(task_and_batch):
    task, _, batch = task_and_batch
    task.train()
    optimizer = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=3e-3)
    mask_losses = []
    for _ in range(30):
        ce, masks = task.teacher_forced(batch)
        terms = task.loss(ce, masks, batch["masks"])
        mask_losses.append(float(terms["dice"] + terms["refinement"]))
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
    assert sum(m.shape[0] for m in batch["masks"]) > 0
    assert mask_losses[-1] <= 0.5 * mask_losses[0], mask_losses


def test_every_trainable_parameter_gets_a_gradient_or_is_left_to_ddp(task_and_batch):
    """What DDP's default (find_unused_parameters=False) needs: a trained CLIP included (tiny.yaml). CLIP's
    post_layernorm (the pooled class token) gets none: DDP is told to ignore it (kept trainable, so that
    the optimizer states of earlier runs still load)."""
    task, _, batch = task_and_batch
    task.train()
    task.zero_grad(set_to_none=True)
    ce, masks = task.teacher_forced(batch)
    task.loss(ce, masks, batch["masks"])["loss"].backward()
    trained = [name for name, p in task.named_parameters() if p.requires_grad]
    assert any(name.startswith("vision.") for name in trained)
    unused = [name for name, p in task.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == task._ddp_params_and_buffers_to_ignore == [
        "vision.model.post_layernorm.weight", "vision.model.post_layernorm.bias"]
    task.zero_grad(set_to_none=True)


def test_masks_come_back_at_the_original_size_in_text_order(task_and_batch):
    task, _, batch = task_and_batch
    with torch.no_grad():
        _, masks = task.teacher_forced(batch)
    assert [m.shape for m in masks] == [m.shape for m in batch["masks"]]


def test_misaligned_masks_are_refused(task_and_batch):
    task, _, batch = task_and_batch
    broken = dict(batch)
    target = next(i for i, m in enumerate(batch["masks"]) if m.shape[0] > 0)
    broken["masks"] = list(batch["masks"])
    broken["masks"][target] = torch.cat([batch["masks"][target], batch["masks"][target][:1]])
    with pytest.raises(ValueError, match="ground-truth masks"):
        task.teacher_forced(broken)


def test_predict_decodes_one_mask_per_complete_codebook_group(task_and_batch, monkeypatch):
    task, data, _ = task_and_batch
    batch = next(iter(data.predict_dataloader()))
    code = task.codebook.token_ids.tolist()
    eos = task.tokenizer.eos_token_id
    word = task.tokenizer.convert_tokens_to_ids("the")
    # sequence 0: one whole group + one stray codebook token; the others: nothing
    row0 = [word, *code, word, code[0], eos]
    rows = [row0] + [[word, eos] + [eos] * (len(row0) - 2)] * (batch["input_ids"].shape[0] - 1)
    ids = torch.tensor(rows)
    states = torch.randn(*ids.shape, task.lmm.hidden_size)
    monkeypatch.setattr(task.lmm, "generate", lambda inputs, n, eos_id, **options: (ids, states))
    with torch.no_grad():
        out = task.predict_step(batch, 0)
    assert out[0]["masks"].shape[0] == 1 and out[0]["dropped_codebook_tokens"] == 1
    height, width = batch["original_sizes"][0].tolist()
    assert out[0]["masks"].shape[1:] == (height, width) and out[0]["masks"].dtype == torch.bool
    assert "[SEG0]" in out[0]["answer"]
    assert all(o["masks"].shape[0] == 0 for o in out[1:])


def test_real_generation_runs_with_the_kv_cache(task_and_batch):
    task, data, _ = task_and_batch
    batch = next(iter(data.predict_dataloader()))
    with torch.no_grad():
        out = task.predict_step(batch, 0)
    assert len(out) == batch["input_ids"].shape[0]
    assert all(isinstance(o["answer"], str) for o in out)


def test_mismatched_widths_name_the_config_keys(tiny_config, build):
    with pytest.raises(ValueError, match="codebook.hidden_size"):
        build(tiny_config, "--model.init_args.codebook.init_args.hidden_size=48")


@pytest.mark.parametrize(
    ("override", "graph", "groups"),
    [((), True, True), (("--model.init_args.cuda_graph=false", "--model.init_args.complete_codebook_groups=false"), False, False)],
)
def test_the_generation_settings_reach_generation(tiny_config, build, monkeypatch, override, graph, groups):
    task, data = build(tiny_config, *override)
    data.prepare_data()
    data.setup("predict")
    batch = next(iter(data.predict_dataloader()))
    calls, generate = [], task.lmm.generate
    monkeypatch.setattr(task.lmm, "generate", lambda *args, **options: calls.append(options) or generate(*args, **options))
    with torch.no_grad():
        out = task.eval().predict_step(batch, 0)
    assert len(calls) == 1 and calls[0]["cuda_graph"] is graph and len(out) == batch["input_ids"].shape[0]
    group = calls[0]["group"]  # the shapes tokenizer spells a group as its six codebook ids alone
    assert group.tolist() == task.codebook.token_ids.tolist() if groups else group is None


def test_the_padding_of_a_non_square_image_is_left_out_of_attention(task_and_batch):
    """With mask_image_padding (the release's), what the LLM computes does not depend on the pixels of
    the padding; without it, it does."""
    task, _, batch = task_and_batch
    short = dict(batch)
    short["resized_sizes"] = batch["resized_sizes"].clone()
    short["resized_sizes"][0, 0] = 12  # image 0: 12 of 32 rows are the image, the rest padding
    assert batch["padded"] is False  # the collator's flag: the shapes images are square
    short["padded"] = True
    other = dict(short)
    other["pixel_values"] = short["pixel_values"].clone()
    other["pixel_values"][0, :, 16:] = 2.0  # different padding content (rows >= 16: no image row's patch)
    task.eval()

    def forward(b):
        with torch.no_grad():
            _, inputs = task.encode(b, with_labels=True)
            return task.lmm(inputs), inputs

    (first, inputs), (second, _) = forward(short), forward(other)
    attended = inputs.attention_mask.bool()  # (B, S'): the padding's own image tokens are not
    assert torch.allclose(first[attended], second[attended], atol=1e-5)
    image_tokens = inputs.token_ids == task.image_token_id  # (B, S')
    assert inputs.attention_mask[0][image_tokens[0]].tolist() == [1] * 8 + [0] * 8  # 4x4 grid: 2 rows of 4
    assert bool(inputs.attention_mask[1][image_tokens[1]].all())
    assert torch.equal(inputs.position_ids, task.encode(batch, with_labels=True)[1].position_ids)
    task.mask_image_padding = False
    try:
        assert (forward(short)[0][attended] - forward(other)[0][attended]).abs().max() > 1e-3
    finally:
        task.mask_image_padding = True


def test_repeats_that_even_out_the_processes_are_not_scored(task_and_batch, monkeypatch):
    from pixellm.data.eval_sharding import REPEAT_KEY

    task, data, batch = task_and_batch
    monkeypatch.setattr(task, "_trainer", SimpleNamespace(datamodule=data))
    monkeypatch.setattr(task, "log", lambda *args, **kwargs: None)
    last = max(i for i, m in enumerate(batch["masks"]) if m.shape[0] > 0)  # a question with targets
    metas = [dict(m) for m in batch["meta"]]
    metas[last][REPEAT_KEY] = True
    repeated = dict(batch, meta=metas)
    task.eval()
    counts = []
    for b in (batch, repeated):
        task._start_evaluation("val")
        with torch.no_grad():
            outputs = task.validation_step(b, 0)
        counts.append(float(task.split_iou[0].count[0]))
        assert [o["repeat"] for o in outputs] == [REPEAT_KEY in m for m in b["meta"]]
    assert counts[1] == counts[0] - batch["masks"][last].shape[0] > 0  # the repeat's pairs left out


def test_the_logged_losses_leave_the_repeats_out(task_and_batch, monkeypatch):
    """Teacher-forced loss terms are means over the scored questions (synchronised over processes at
    the end of the epoch): a batch with a repeat logs what the batch without it logs."""
    from pixellm.data.eval_sharding import REPEAT_KEY

    task, data, batch = task_and_batch
    logged = {}
    monkeypatch.setattr(task, "_trainer", SimpleNamespace(datamodule=data))
    monkeypatch.setattr(task, "log", lambda key, value, **kwargs: logged.update({key: float(value)}))
    size = len(batch["masks"])
    last = max(i for i, m in enumerate(batch["masks"]) if m.shape[0] > 0)
    kept = [q for q in range(size) if q != last]
    metas = [dict(m, **({REPEAT_KEY: True} if q == last else {})) for q, m in enumerate(batch["meta"])]

    def rows(value):  # the batch without question ``last``
        if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == size:
            return value[kept]
        return [value[q] for q in kept] if isinstance(value, list) and len(value) == size else value

    task.eval()
    results = []
    for b in (dict(batch, meta=metas), {key: rows(value) for key, value in batch.items()}):
        logged.clear()
        task._start_evaluation("val")
        with torch.no_grad():
            task.validation_step(b, 0)
        task._log_splits()
        results.append({k: v for k, v in logged.items() if k.split("/")[1] in task.loss.term_names})
    with_repeat, without = results
    assert set(with_repeat) == {f"val/{term}" for term in task.loss.term_names} == set(without)
    for key, value in without.items():
        assert with_repeat[key] == pytest.approx(value, rel=1e-5), key


@pytest.mark.parametrize("name", ["refcocog.val", "eval", "train", "type"])
def test_any_split_name_is_evaluated_and_logged(task_and_batch, monkeypatch, name):
    """Split names are not module keys: a dot, or the name of a module attribute, is fine."""
    task, data, batch = task_and_batch
    logged = {}
    monkeypatch.setattr(task, "_trainer", SimpleNamespace(datamodule=SimpleNamespace(
        eval_splits=lambda stage: [EvalSplit(name)])))
    monkeypatch.setattr(task, "log", lambda key, value, **kwargs: logged.update({key: float(value)}))
    task.eval()
    task._start_evaluation("val")
    with torch.no_grad():
        task.validation_step(batch, 0)
    task._log_splits()
    assert 0.0 <= logged[f"{name}/gIoU"] <= 1.0 and 0.0 <= logged[f"{name}/cIoU"] <= 1.0
