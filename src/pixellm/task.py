"""PixelLMTask: the one LightningModule. Composes the parts of Fig. 2 and owns training logic.

Data flow of one batch (B questions, T targets in all):

    pixel_values (B, 3, S, S) --vision--> L maps (B, C, h, w)
    scale 0 --lmm.embed_image--> (B, P, H) image tokens, spliced into the text --LLM--> hidden (B, S', H)
    hidden at the positions that emit codebook tokens --codebook--> queries (T, L, D)
    L maps --projection--> (B, D, h, w) each --decoder(+queries)--> logits (T, h', w')
    --decoder.postprocess--> per question (K_b, H_b, W_b) logits at the original image size
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from lightning import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric

from pixellm.data.eval_sharding import is_repeat
from pixellm.data.splits import EvalSplit
from pixellm.evaluation.matching import MatchCost, concatenate, match_batch, text_order_pairs
from pixellm.evaluation.muse_protocol import pair_scores
from pixellm.metrics.iou import PairedMaskIoU
from pixellm.model.codebook import GatheredTargets, SegmentationCodebook
from pixellm.model.decoder import PixelDecoder
from pixellm.model.lmm import LlavaLMM, MultimodalInputs
from pixellm.model.losses import PixelLMLoss
from pixellm.model.projection import VisionDecoderProjection
from pixellm.model.vision import VisionEncoder, valid_cells
from pixellm.reliability.batch_rng import seed_batch
from pixellm.reliability.codebook_groups import decode_answer, drop_malformed_groups, spelled_group
from pixellm.reliability.nonfinite import NonFiniteLossGuard, any_rank_decision, skipped_step_loss
from pixellm.reliability.skipping import is_empty_batch
from pixellm.schedule import WarmupLinearLR
from pixellm.tokenizer import IMAGE_TOKEN, load_tokenizer

HEADLINE_SCORES = ("gIoU", "cIoU")


@dataclass
class Generation:
    """Greedy answers of a batch and the mask logits of their codebook groups."""

    answers: list[str]  # B decoded answers, codebook tokens as their strings
    logits: list[Tensor]  # B x (K_b, H_b, W_b) mask logits in text order, original image size
    dropped_tokens: Tensor  # (B,) codebook tokens of an incomplete trailing group, ignored


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
        max_new_tokens: generation length limit of ``predict_step`` and generate-mode evaluation.
        cuda_graph: on a GPU, replay generation's decoding step as a CUDA graph (``LlavaLMM.generate``);
            False runs every step eagerly (for profilers and debuggers that follow kernels one by one).
        complete_codebook_groups: in generation, once a target's first codebook token is emitted, write the
            rest of its group as training answers spell it (``LlavaLMM.generate``'s ``group``): no logits at
            those positions and, for a single question, the group fed in one step; no group is broken off.
            False: every id from the LM head, as the release decodes (a broken group yields no mask).
        match_cost: cost of the Hungarian matching of generated to ground-truth masks in
            generate-mode evaluation: "iou" (1 - IoU, the paper) or "bce_dice" (the released code's).
        max_nonfinite_steps: training steps with a NaN/Inf loss that are skipped (no update) before
            the run stops (see ``NonFiniteLossGuard``).
        mask_image_padding: keep the bottom/right padding of non-square images out of attention, as
            the release does: a key-padding mask in the vision encoder (``VisionEncoder.forward``'s
            ``resized_sizes``) and on the LLM's image tokens. False attends to the padding as well.
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
        cuda_graph: bool = True,
        complete_codebook_groups: bool = True,
        match_cost: MatchCost = "iou",
        max_nonfinite_steps: int = 10,
        mask_image_padding: bool = True,
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
        self.cuda_graph = cuda_graph
        self.complete_codebook_groups = complete_codebook_groups
        self.match_cost = match_cost
        self.nonfinite = NonFiniteLossGuard(max_nonfinite_steps)
        self.batch_rng_seed: int | None = None  # seeds every training batch's random draws (reliability.batch_rng)
        self.mask_image_padding = mask_image_padding
        # read by DistributedDataParallel: trainable parameters that never get a gradient, which it would refuse
        self._ddp_params_and_buffers_to_ignore = [f"vision.{name}" for name in vision.unused_parameters]
        self.tokenizer = load_tokenizer(tokenizer, codebook.tokens)
        self.codebook.bind(self.tokenizer.convert_tokens_to_ids(codebook.tokens))
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.spelled_group = spelled_group(self.tokenizer, codebook.tokens)  # the C ids generation completes
        self.lmm.extend_vocabulary(len(self.tokenizer))
        self._check_widths()
        self.splits: list[EvalSplit] = []  # the running evaluation's splits (names: any string, not module keys)
        self.split_iou = nn.ModuleList()  # one PairedMaskIoU per split, in that order, per epoch
        self.split_losses = nn.ModuleList()  # per split, one MeanMetric per loss term (teacher-forced splits)

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
        """Vision features of every scale and the spliced LLM inputs (with ``mask_image_padding``, the
        padding of a batch that has some, ``batch["padded"]``, is kept out of the vision encoder's and
        the LLM's attention)."""
        pixels = batch["pixel_values"]  # (B, 3, S, S)
        padded = self.mask_image_padding and batch.get("padded", True)
        sizes = batch["resized_sizes"].to(pixels.device) if padded else None  # (B, 2) or None
        features = self.vision(pixels, sizes)  # L x (B, C, h, w)
        image_embeds = self.lmm.embed_image(features[0])  # (B, P, H)
        image_mask = None
        if sizes is not None:
            side = math.isqrt(image_embeds.shape[1])  # the image tokens' square grid
            image_mask = valid_cells(sizes, pixels.shape[-1], side, self.vision.grid_size).flatten(1)  # (B, P)
        inputs = self.lmm.build_inputs(
            batch["input_ids"],
            batch["attention_mask"],
            image_embeds,
            self.image_token_id,
            batch["labels"] if with_labels else None,
            image_mask,
        )
        return features, inputs

    def decode_masks(self, features: list[Tensor], targets: GatheredTargets, batch: dict) -> list[Tensor]:
        """Mask logits of every target, per question at the original image size (K_b, H_b, W_b)."""
        queries = self.codebook(targets.states)  # (T, L, D)
        decoder_features = self.projection(features)  # L x (B, D, h, w)
        logits = self.decoder(decoder_features, queries, targets.batch_index)  # (T, h', w')
        return self.decoder.postprocess(
            logits,
            targets.batch_index,
            batch["pixel_values"].shape[-1],
            batch["resized_sizes"],
            batch["original_sizes"],
        )

    def teacher_forced(self, batch: dict, ce_rows: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
        """Next-token CE (over the questions ``ce_rows`` (B,) bool marks; all if None) and the mask logits
        of the ground-truth answer's codebook tokens."""
        features, inputs = self.encode(batch, with_labels=True)
        hidden = self.lmm(inputs)  # (B, S', H)
        labels = inputs.labels if ce_rows is None else inputs.labels.masked_fill(~ce_rows[:, None], -100)
        ce = self.lmm.next_token_loss(hidden, labels)
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
    def training_step(self, batch: dict, batch_idx: int) -> Tensor | None:
        if is_empty_batch(batch):  # every sample was skipped: no update, but the ranks' decision is still joined
            self.nonfinite.should_skip(torch.zeros(()), self.global_step, any_rank_decision(self))
            return skipped_step_loss(self)
        ce, masks = self.teacher_forced(batch)
        terms = self.loss(ce, masks, batch["masks"])
        if self.nonfinite.should_skip(terms["loss"], self.global_step, any_rank_decision(self)):
            return skipped_step_loss(self)
        batch_size = len(batch["masks"])
        for name, value in terms.items():
            self.log(f"train/{name}", value, batch_size=batch_size, prog_bar=name == "loss")
        return terms["loss"]

    def on_fit_start(self) -> None:
        if self.batch_rng_seed is None:  # a resumed run keeps the seed of its checkpoint
            self.batch_rng_seed = torch.initial_seed()  # seed_everything's, else torch's own

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        # dropout draws as a function of (seed, epoch, batch, process): the same after a resume
        seed_batch(self.batch_rng_seed, self.current_epoch, batch_idx, self.global_rank)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["batch_rng_seed"] = self.batch_rng_seed

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.batch_rng_seed = checkpoint.get("batch_rng_seed", self.batch_rng_seed)

    def eval_splits(self, stage: str) -> list[EvalSplit]:
        """The evaluation split of each ``stage`` ("val"/"test") dataloader, from the data module.

        A data module without ``eval_splits`` gets one teacher-forced split named ``stage``.
        """
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "eval_splits"):
            return list(datamodule.eval_splits(stage))
        return [EvalSplit(stage)]

    def _split(self, stage: str, dataloader_idx: int) -> EvalSplit:
        splits = self.eval_splits(stage)
        if dataloader_idx >= len(splits):
            raise ValueError(
                f"{stage} dataloader {dataloader_idx} has no evaluation split: the data module names "
                f"{len(splits)} ({[s.name for s in splits]}); make eval_splits({stage!r}) list one per dataloader"
            )
        return splits[dataloader_idx]

    def _start_evaluation(self, stage: str) -> None:
        self.splits = self.eval_splits(stage)
        self.split_iou = nn.ModuleList(PairedMaskIoU() for _ in self.splits).to(self.device)
        # teacher-forced loss terms, means over the scored questions of every process
        self.split_losses = nn.ModuleList(
            nn.ModuleList(MeanMetric() for _ in self.loss.term_names) for _ in self.splits
        ).to(self.device)

    def _evaluate(self, batch: dict, stage: str, dataloader_idx: int) -> list[dict]:
        """Evaluate a batch of one split of ``stage``; feed its IoU metric.

        Teacher-forced splits decode the ground-truth answer's masks and pair them in text order
        (and log the losses); generate-mode splits generate the answer and match its masks to the
        ground truth (Hungarian, ``match_cost``).

        Returns:
            Per question: ``split``, ``question``, ``answer``, ``pairs`` (``MatchedPairs``),
            ``masks`` (P, H, W) bool predictions, ``meta`` and ``repeat`` (a repeat that only evens
            out the processes, ``pixellm.data.eval_sharding``: not scored), for the evaluation callbacks.
        """
        if is_empty_batch(batch):
            return []
        split = self._split(stage, dataloader_idx)
        index = self.splits.index(split)
        truth = batch["masks"]
        scored = [not is_repeat(m) for m in batch["meta"]]  # repeats even out the processes: not scored
        if split.mode == "teacher_forced":
            ce, logits = self.teacher_forced(batch, torch.tensor(scored, device=self.device))
            if any(scored):
                kept = [q for q, keep in enumerate(scored) if keep]
                terms = self.loss(ce, [logits[q] for q in kept], [truth[q] for q in kept])
                for name, mean in zip(self.loss.term_names, self.split_losses[index], strict=True):
                    mean.update(terms[name].detach(), weight=len(kept))
            pairs = text_order_pairs(logits, truth)
            answers = batch["answers"]
        else:
            generation = self.generate_answers(batch)
            logits, answers = generation.logits, generation.answers
            pairs = match_batch(logits, truth, self.match_cost)
        scored_pairs = [p for p, keep in zip(pairs, scored, strict=True) if keep]
        if scored_pairs:
            self.split_iou[index].update(
                *concatenate(scored_pairs), torch.cat([pair_scores(p, None) for p in scored_pairs])
            )
        return [
            {"split": split, "question": q, "answer": a, "pairs": p, "masks": x > 0, "meta": m, "repeat": is_repeat(m)}
            for q, a, p, x, m in zip(batch["questions"], answers, pairs, logits, batch["meta"], strict=True)
        ]

    def _log_splits(self) -> None:
        """Log every split's gIoU / cIoU (and few/many where the split has such questions) and, for a
        teacher-forced split, its loss terms; each a value over all processes' scored questions."""
        for split, metric, losses in zip(self.splits, self.split_iou, self.split_losses, strict=True):
            for key, value in metric.compute().items():
                if key in HEADLINE_SCORES or not bool(value.isnan()):
                    self.log(f"{split.name}/{key}", value, prog_bar=key in HEADLINE_SCORES, add_dataloader_idx=False)
            metric.reset()
            if split.mode == "teacher_forced":
                for term, mean in zip(self.loss.term_names, losses, strict=True):
                    value = mean.compute()  # synchronised over the processes (a question-weighted mean)
                    if not bool(value.isnan()):
                        self.log(f"{split.name}/{term}", value, add_dataloader_idx=False)
                    mean.reset()

    def on_validation_epoch_start(self) -> None:
        self._start_evaluation("val")

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> list[dict]:
        return self._evaluate(batch, "val", dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._log_splits()

    def on_test_epoch_start(self) -> None:
        self._start_evaluation("test")

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> list[dict]:
        return self._evaluate(batch, "test", dataloader_idx)

    def on_test_epoch_end(self) -> None:
        self._log_splits()

    def generate_answers(self, batch: dict) -> Generation:
        """Greedy generation with a KV cache; masks from the states that emitted codebook tokens."""
        features, inputs = self.encode(batch, with_labels=False)
        eos = self.tokenizer.eos_token_id
        group = torch.tensor(self.spelled_group, device=inputs.inputs_embeds.device) if self.complete_codebook_groups else None
        ids, states = self.lmm.generate(inputs, self.max_new_tokens, eos, cuda_graph=self.cuda_graph, group=group)  # (B, n), (B, n, H)
        after_eos = (ids == eos).cumsum(1) > 0
        ids = ids.masked_fill(after_eos, eos)
        whole_groups, malformed = drop_malformed_groups(ids, self.codebook.token_ids, eos)
        targets = self.codebook.gather(states, whole_groups, strict=False)
        logits = self.decode_masks(features, targets, batch)
        codes = self.codebook.token_ids.tolist()
        answers = [decode_answer(self.tokenizer, ids[b][~after_eos[b]].tolist(), codes) for b in range(ids.shape[0])]
        return Generation(answers, logits, targets.dropped_tokens + malformed)

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        """Generated answers (``generate_answers``).

        Returns, per question: the answer text, (K, H, W) bool masks in text order and their logits,
        and the count of codebook tokens ignored because they did not complete an in-order group
        of L*N.
        """
        if is_empty_batch(batch):
            return []
        generation = self.generate_answers(batch)
        return [
            {
                "question": batch["questions"][b],
                "answer": generation.answers[b],
                "masks": generation.logits[b] > 0,
                "mask_logits": generation.logits[b],  # (K, H, W)
                "dropped_codebook_tokens": int(generation.dropped_tokens[b]),
                "meta": batch["meta"][b],
            }
            for b in range(len(generation.answers))
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

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip as configured; under FSDP clip the norm through FSDP itself (Lightning's FSDP precision refuses it)."""
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = self.trainer.strategy.model
        by_norm = gradient_clip_algorithm in (None, "norm")
        if gradient_clip_val and by_norm and isinstance(model, FullyShardedDataParallel):
            model.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
