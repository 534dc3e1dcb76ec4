"""8-/4-bit LLM weights with bitsandbytes (the optional ``pixellm[quant]`` extra).

The linear layers inside the LLM's decoder blocks are replaced by ``bitsandbytes``' ``Linear8bitLt``
(int8, outlier threshold 6) or ``Linear4bit`` (NF4); the LM head, the embeddings, LoRA adapters,
the vision side, the codebook and the pixel decoder keep their precision. Inference only.
"""

from __future__ import annotations

import torch
from torch import nn

from pixellm.task import PixelLMTask

QUANT_BITS = {"8bit": 8, "4bit": 4}


def _quantized(linear: nn.Linear, bits: int, compute_dtype: torch.dtype, device: torch.device) -> nn.Module:
    import bitsandbytes as bnb

    bias = linear.bias is not None
    if bits == 8:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias,
                                    has_fp16_weights=False, threshold=6.0)
        layer.weight = bnb.nn.Int8Params(linear.weight.data, requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias,
                                  compute_dtype=compute_dtype, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4")
    if bias:
        layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return layer.to(device)  # bitsandbytes quantizes when the weights move to the device


def quantize_llm(task: PixelLMTask, quantize: str, compute_dtype: torch.dtype, device: torch.device) -> int:
    """Quantize the LLM's decoder-block linear layers in place; returns how many were replaced.

    Args:
        task: a loaded task, already on ``device`` in ``compute_dtype``.
        quantize: ``"8bit"`` or ``"4bit"``.
        compute_dtype: dtype of activations (4-bit layers compute in it).
        device: where the model runs.

    Raises:
        ImportError: bitsandbytes is not installed.
        ValueError: an unknown ``quantize``.
    """
    if quantize not in QUANT_BITS:
        raise ValueError(f"quantize must be one of {sorted(QUANT_BITS)}, got {quantize!r}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ImportError(
            f"--quantize {quantize} needs bitsandbytes: pip install 'pixellm[quant]'"
        ) from err
    replaced = 0
    for parent_name, parent in list(task.lmm.language_model.layers.named_modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and "lora_" not in f"{parent_name}.{name}":
                setattr(parent, name, _quantized(child, QUANT_BITS[quantize], compute_dtype, device))
                replaced += 1
    return replaced
