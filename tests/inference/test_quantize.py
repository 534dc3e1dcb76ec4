"""8-/4-bit LLM weights: bitsandbytes layers in the decoder blocks, answers unchanged."""

from __future__ import annotations

import sys

import pytest
import torch
from trained_tiny import QUESTION, random_image

from pixellm.export import load_pretrained
from pixellm.inference.predictor import Predictor, Request
from pixellm.inference.quantize import quantize_llm


def test_quantize_without_bitsandbytes_says_what_to_install(exported_tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    task = load_pretrained(exported_tiny).task
    with pytest.raises(ImportError, match=r"pip install 'pixellm\[quant\]'"):
        quantize_llm(task, "8bit", torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("quantize", ["8bit", "4bit"])
def test_quantized_llm_answers_like_full_precision(exported_tiny, quantize):
    bnb = pytest.importorskip("bitsandbytes")
    request = [Request(random_image(7, (40, 30)), QUESTION)]
    full = Predictor(load_pretrained(exported_tiny)).predict(request)[0]
    predictor = Predictor(load_pretrained(exported_tiny), quantize=quantize)
    layers = predictor.task.lmm.language_model.layers[0]
    kind = bnb.nn.Linear8bitLt if quantize == "8bit" else bnb.nn.Linear4bit
    assert all(isinstance(m, kind) for m in (layers.self_attn.q_proj, layers.mlp.down_proj))
    assert type(predictor.task.lmm.lm_head) is torch.nn.Linear
    quantized = predictor.predict(request)[0]
    assert quantized.text == full.text == "the circle [1] and the square [2]."
    assert quantized.masks.shape == full.masks.shape
    assert (quantized.masks == full.masks).float().mean() > 0.9
