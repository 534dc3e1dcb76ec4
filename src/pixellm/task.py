"""PixelLMTask: the one LightningModule. Composes the parts of Fig. 2 and owns training logic.

Data flow of one batch (B questions, T targets in all):

    pixel_values (B, 3, S, S) --vision--> L maps (B, C, h, w)
    scale 0 --lmm.embed_image--> (B, P, H) image tokens, spliced into the text --LLM--> hidden (B, S', H)
    hidden at the positions that emit codebook tokens --codebook--> queries (T, L, D)
    L maps --projection--> (B, D, h, w) each --decoder(+queries)--> logits (T, h', w')
    --decoder.postprocess--> per question (K_b, H_b, W_b) logits at the original image size
"""

from __future__ import annotations

import torch
from lightning import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from pixellm.metrics.iou import MaskIoU
from pixellm.model.codebook import GatheredTargets, SegmentationCodebook
from pixellm.model.decoder import PixelDecoder
from pixellm.model.lmm import LlavaLMM, MultimodalInputs
from pixellm.model.losses import PixelLMLoss
from pixellm.model.projection import VisionDecoderProjection
from pixellm.model.vision import VisionEncoder
from pixellm.schedule import WarmupLinearLR
from pixellm.tokenizer import IMAGE_TOKEN, load_tokenizer


class PixelLMTask(LightningModule):
    """PixelLM: vision encoder + LLM + segmentation codebook + pixel decoder, trained end to end.

    Args:
        vision: multi-scale vision encoder I.
        lmm: the LLM F with its vision-to-language projection p_V->T.
        codebook: the segmentation codebook C_seg with token fusion phi.
        projection: the vision-to-decoder projection p_V->D.
        decoder: the pixel decoder D.
        tokenizer: ``"shapes"`` (the embedded dataset's) or a local tokenizer directory; the data
            module must use the same.
        loss: the loss stack; ``None`` uses ``PixelLMLoss()`` (the released weights).
        optimizer: builds the optimizer from the trainable parameters (official: AdamW lr 3e-4,
            betas (0.9, 0.95), weight decay 0).
        scheduler: builds the LR scheduler from the optimizer, stepped every optimizer step.
        max_new_tokens: generation length limit of ``predict_step``.
    """

    def __init__(
        self,
        *,
        vision: VisionEncoder,
        lmm: LlavaLMM,
        codebook: SegmentationCodebook,
        projection: VisionDecoderProjection,
        decoder: PixelDecoder,
        tokenizer: str = "shapes",
        loss: PixelLMLoss | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        max_new_tokens: int = 64,
    ) -> None:
        super().__init__()
        self.vision = vision
        self.lmm = lmm
        self.codebook = codebook
        self.projection = projection
        self.decoder = decoder
        self.loss = loss if loss is not None else PixelLMLoss()
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.max_new_tokens = max_new_tokens
        self.tokenizer = load_tokenizer(tokenizer, codebook.tokens)
        self.codebook.bind(self.tokenizer.convert_tokens_to_ids(codebook.tokens))
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.lmm.extend_vocabulary(len(self.tokenizer))
        self._check_widths()
        self.iou = nn.ModuleDict({"val": MaskIoU(), "test": MaskIoU()})

    def _check_widths(self) -> None:
        """Fail at construction, with the config keys to fix, when the parts do not fit together."""
        pairs = [
            ("lmm hidden size", self.lmm.hidden_size, "codebook.hidden_size", self.codebook.hidden_size),
            ("vision.out_channels", self.vision.out_channels, "projection.in_channels", self.projection.in_channels),
            ("vision.out_channels", self.vision.out_channels, "lmm projector input", self.lmm.projector.linear_1.in_features),
            ("decoder.dim", self.decoder.dim, "projection.out_channels", self.projection.out_channels),
            ("decoder.dim", self.decoder.dim, "codebook.decoder_dim", self.codebook.decoder_dim),
            ("vision.num_scales", self.vision.num_scales, "codebook.num_scales", self.codebook.num_scales),
            ("vision.num_scales", self.vision.num_scales, "decoder.num_scales", self.decoder.num_scales),
        ]
        for name_a, a, name_b, b in pairs:
            if a != b:
                raise ValueError(f"{name_a} = {a} but {name_b} = {b}: set them equal in the config")

    # ------------------------------------------------------------------ shared forward pieces
    def encode(self, batch: dict, with_labels: bool) -> tuple[list[Tensor], MultimodalInputs]:
        """Vision features of every scale and the spliced LLM inputs."""
        features = self.vision(batch["pixel_values"])  # L x (B, C, h, w)
        image_embeds = self.lmm.embed_image(features[0])  # (B, P, H)
        inputs = self.lmm.build_inputs(
            batch["input_ids"],
            batch["attention_mask"],
            image_embeds,
            self.image_token_id,
            batch["labels"] if with_labels else None,
        )
        return features, inputs

    def decode_masks(self, features: list[Tensor], targets: GatheredTargets, batch: dict) -> list[Tensor]:
        """Mask logits of every target, per question at the original image size (K_b, H_b, W_b)."""
        queries = self.codebook(targets.states)  # (T, L, D)
        decoder_features = [self.projection(f) for f in features]  # L x (B, D, h, w)
        logits = self.decoder(decoder_features, queries, targets.batch_index)  # (T, h', w')
        return self.decoder.postprocess(
            logits,
            targets.batch_index,
            batch["pixel_values"].shape[-1],
            batch["resized_sizes"],
            batch["original_sizes"],
        )

    def teacher_forced(self, batch: dict) -> tuple[Tensor, list[Tensor]]:
        """Next-token CE and the mask logits of the ground-truth answer's codebook tokens."""
        features, inputs = self.encode(batch, with_labels=True)
        hidden = self.lmm(inputs)  # (B, S', H)
        ce = self.lmm.next_token_loss(hidden, inputs.labels)
        targets = self.codebook.gather(hidden[:, :-1], inputs.token_ids[:, 1:], strict=True)
        masks = self.decode_masks(features, targets, batch)
        for question, (pred, truth) in enumerate(zip(masks, batch["masks"], strict=True)):
            if pred.shape[0] != truth.shape[0]:
                raise ValueError(
                    f"question {question} ({batch['meta'][question]}): the answer holds {pred.shape[0]} "
                    f"codebook groups but {truth.shape[0]} ground-truth masks"
                )
        return ce, masks

    # ------------------------------------------------------------------ Lightning hooks
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        ce, masks = self.teacher_forced(batch)
        terms = self.loss(ce, masks, batch["masks"])
        batch_size = len(batch["masks"])
        for name, value in terms.items():
            self.log(f"train/{name}", value, batch_size=batch_size, prog_bar=name == "loss")
        return terms["loss"]

    def _evaluate(self, batch: dict, stage: str) -> None:
        """Teacher-forced losses and masks of ``stage`` ("val" or "test") into its IoU metric."""
        ce, masks = self.teacher_forced(batch)
        terms = self.loss(ce, masks, batch["masks"])
        batch_size = len(batch["masks"])
        for name, value in terms.items():
            self.log(f"{stage}/{name}", value, batch_size=batch_size)
        self.iou[stage].update(masks, batch["masks"])

    def _log_iou(self, stage: str) -> None:
        scores = self.iou[stage].compute()
        self.log(f"{stage}/gIoU", scores["gIoU"], prog_bar=True)
        self.log(f"{stage}/cIoU", scores["cIoU"], prog_bar=True)
        self.iou[stage].reset()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_iou("val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_iou("test")

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        """Greedy generation with a KV cache; masks from the states that emitted codebook tokens.

        Returns, per question: the answer text, (K, H, W) bool masks in text order and their logits,
        and the count of codebook tokens ignored because they did not complete a group of L*N.
        """
        features, inputs = self.encode(batch, with_labels=False)
        eos = self.tokenizer.eos_token_id
        ids, states = self.lmm.generate(inputs, self.max_new_tokens, eos)  # (B, n), (B, n, H)
        after_eos = (ids == eos).cumsum(1) > 0
        ids = ids.masked_fill(after_eos, eos)
        targets = self.codebook.gather(states, ids, strict=False)
        masks = self.decode_masks(features, targets, batch)
        return [
            {
                "question": batch["questions"][b],
                "answer": self.tokenizer.decode(ids[b][~after_eos[b]].tolist()),
                "masks": masks[b] > 0,
                "mask_logits": masks[b],  # (K, H, W)
                "dropped_codebook_tokens": int(targets.dropped_tokens[b]),
                "meta": batch["meta"][b],
            }
            for b in range(ids.shape[0])
        ]

    @classmethod
    def from_pretrained(
        cls, directory: str, base_model: str | None = None, vision_model: str | None = None
    ) -> PixelLMTask:
        """Load a folder written by ``pixellm export`` (see ``pixellm.export.load_pretrained``)."""
        from pixellm.export import load_pretrained  # late import: export imports this module

        return load_pretrained(directory, base_model=base_model, vision_model=vision_model).task

    def configure_optimizers(self) -> dict:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        scheduler = self.scheduler_factory(optimizer)
        if isinstance(scheduler, WarmupLinearLR) and scheduler.total_steps is None:
            scheduler.total_steps = int(self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
