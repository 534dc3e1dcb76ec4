"""Generation that completes a codebook group once its first token is emitted (``LlavaLMM.generate(group=...)``)."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pixellm.model.decoding import StaticLlamaDecoder
from pixellm.model.lmm import LlavaLMM

IMAGE_ID = 39
TEXT = dict(
    vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
)
PROMPTS = [[1, IMAGE_ID, 4, 9], [1, 5, 6, IMAGE_ID, 3, 8]]


def make() -> LlavaLMM:
    torch.manual_seed(0)
    return LlavaLMM(text_config=TEXT, vision_channels=8).eval()


def single(lmm: LlavaLMM, row: int):
    prompt = torch.tensor([PROMPTS[row]])
    image = torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(1))[row : row + 1]
    return lmm.build_inputs(prompt, torch.ones_like(prompt), image, IMAGE_ID), prompt, image


def teacher_forced_states(lmm: LlavaLMM, prompt: torch.Tensor, image: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """(n, H): the states of one forward over prompt + ids[:-1] at the positions that emit ids."""
    sequence = torch.cat([prompt, torch.tensor([ids[:-1]])], 1)
    inputs = lmm.build_inputs(sequence, torch.ones_like(sequence), image, IMAGE_ID)
    with torch.no_grad():
        return lmm(inputs)[0, -len(ids) :]


def count_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    lengths, forward = [], StaticLlamaDecoder.forward  # the static decoder's calls, by tokens fed
    monkeypatch.setattr(StaticLlamaDecoder, "forward", lambda self, embeds, *rest, **options: lengths.append(embeds.shape[1])
                        or forward(self, embeds, *rest, **options))
    return lengths


def test_a_group_the_model_writes_anyway_gives_the_same_answer_in_fewer_steps(monkeypatch):
    lmm = make()
    inputs, prompt, image = single(lmm, 1)
    free, free_states = lmm.generate(inputs, max_new_tokens=12, eos_token_id=-1)
    ids = free[0].tolist()
    # a run of 3 distinct ids whose first appears nowhere else: completing it changes nothing
    start = next(j for j in range(1, 8) if ids.count(ids[j]) == 1 and len(set(ids[j : j + 3])) == 3)
    group = torch.tensor(ids[start : start + 3])
    lengths = count_calls(monkeypatch)
    completed, states = lmm.generate(inputs, max_new_tokens=12, eos_token_id=-1, group=group)
    assert completed[0].tolist() == ids
    torch.testing.assert_close(states, free_states, rtol=1e-5, atol=1e-5)
    assert lengths == [prompt.shape[1] + 3] + [1] * start + [3] + [1] * (12 - start - 4)  # 9 steps, not 11
    dynamic, dynamic_states = lmm.generate(inputs, max_new_tokens=12, eos_token_id=-1, static_cache=False, group=group)
    assert dynamic[0].tolist() == ids
    torch.testing.assert_close(dynamic_states, free_states, rtol=1e-5, atol=1e-5)


def test_a_group_the_model_would_break_is_written_whole_and_decoding_goes_on_after_it():
    lmm = make()
    inputs, prompt, image = single(lmm, 0)
    free, _ = lmm.generate(inputs, max_new_tokens=8, eos_token_id=-1)
    first = int(free[0, 0])
    unlikely = [t for t in range(IMAGE_ID) if t not in free[0].tolist()][:2]  # ids free decoding never writes
    group = torch.tensor([first, *unlikely])
    for static_cache in (True, False):
        ids, states = lmm.generate(inputs, max_new_tokens=8, eos_token_id=-1, static_cache=static_cache, group=group)
        answer = ids[0].tolist()
        assert answer[:3] == group.tolist()
        torch.testing.assert_close(states[0], teacher_forced_states(lmm, prompt, image, answer), rtol=1e-5, atol=1e-5)
        assert answer[3] == int(lmm.lm_head(states[0, 3]).argmax())  # after the group: the head's choice again


def test_a_group_is_cut_at_the_length_limit():
    lmm = make()
    inputs, prompt, image = single(lmm, 0)
    first = int(lmm.generate(inputs, max_new_tokens=1, eos_token_id=-1)[0][0, 0])
    group = torch.tensor([first, 20, 21, 22, 23])
    ids, states = lmm.generate(inputs, max_new_tokens=3, eos_token_id=-1, group=group)
    assert ids[0].tolist() == [first, 20, 21]
    torch.testing.assert_close(states[0], teacher_forced_states(lmm, prompt, image, [first, 20, 21]), rtol=1e-5, atol=1e-5)


def test_rows_that_start_groups_at_different_steps_decode_as_they_do_alone(monkeypatch):
    lmm = make()
    alone = [single(lmm, row)[0] for row in (0, 1)]
    first = int(lmm.generate(alone[0], max_new_tokens=1, eos_token_id=-1)[0][0, 0])
    group = torch.tensor([first, 30, 31])
    expected = [lmm.generate(inputs, max_new_tokens=7, eos_token_id=-1, group=group) for inputs in alone]
    assert expected[0][0][0, :3].tolist() == [first, 30, 31] and first not in expected[1][0][0].tolist()
    batch = torch.tensor([[0, 0, *PROMPTS[0]], PROMPTS[1]])  # row 0 left padded
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    image = torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(1))
    lengths = count_calls(monkeypatch)
    ids, states = lmm.generate(lmm.build_inputs(batch, mask, image, IMAGE_ID), 7, eos_token_id=-1, group=group)
    assert lengths == [9] + [1] * 6  # one row in a group, the other not: one token per step
    assert ids.tolist() == [expected[0][0][0].tolist(), expected[1][0][0].tolist()]
    torch.testing.assert_close(states, torch.cat([expected[0][1], expected[1][1]]), rtol=1e-5, atol=1e-5)


def test_a_completed_group_skips_the_lm_head_and_nothing_else():
    """Fed in one step, a group of C ids costs the same matmuls as C one-token steps, less C - 1 head rows."""
    lmm = make()
    inputs, _, _ = single(lmm, 1)
    first = int(lmm.generate(inputs, max_new_tokens=1, eos_token_id=-1)[0][0, 0])
    flops = []
    for group in (None, torch.tensor([first, 20, 21, 22])):
        with FlopCounterMode(display=False) as counter:
            ids, _ = lmm.generate(inputs, max_new_tokens=9, eos_token_id=-1, group=group)
        flops.append(counter.get_total_flops())
        assert ids.shape == (1, 9)
    assert flops[0] - flops[1] == 3 * 2 * TEXT["hidden_size"] * TEXT["vocab_size"]


def test_a_group_holding_the_eos_id_is_refused():
    lmm = make()
    inputs, _, _ = single(lmm, 0)
    with pytest.raises(ValueError, match="without the eos id"):
        lmm.generate(inputs, max_new_tokens=4, eos_token_id=7, group=torch.tensor([5, 7]))


def test_steps_where_every_row_is_inside_a_group_skip_the_lm_head(monkeypatch):
    """Row 0 starts the group at step 0 and row 1 at step 1: at steps 2 and 3 both rows are inside it."""
    lmm = make()
    prompts = torch.tensor([[1, IMAGE_ID, 1, 1], [1, IMAGE_ID, 1, 4]])
    image = torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(1)).expand(2, -1, -1)
    inputs = lmm.build_inputs(prompts, torch.ones_like(prompts), image, IMAGE_ID)
    free, _ = lmm.generate(inputs, max_new_tokens=7, eos_token_id=-1)
    assert free[:, :2].tolist() == [[20, free[0, 1]], [free[1, 0], 20]] and 20 not in (free[0, 1], free[1, 0])
    group = torch.tensor([20, 30, 31, 32])
    lengths, flops = count_calls(monkeypatch), []
    for chosen in (None, group):
        with FlopCounterMode(display=False) as counter:
            ids, _ = lmm.generate(inputs, max_new_tokens=7, eos_token_id=-1, group=chosen)
        flops.append(counter.get_total_flops())
    assert ids[0, :4].tolist() == [20, 30, 31, 32] and ids[1, 1:5].tolist() == [20, 30, 31, 32]
    assert lengths == ([prompts.shape[1] + 3] + [1] * 6) * 2  # never a whole-group step: the rows are apart
    assert flops[0] - flops[1] == 2 * 2 * (2 * TEXT["hidden_size"] * TEXT["vocab_size"])  # 2 steps x 2 rows
