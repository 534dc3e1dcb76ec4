"""Multi-scale vision encoders I (Sec. 3.1): an image -> L feature maps I_img^l on the patch grid.

`VisionEncoder` is the contract the task depends on; two implementations:

- `CLIPVisionEncoder`: `transformers.CLIPVisionModel`, the paper's encoder (CLIP ViT-L/14-336 run
  at 448 px with bilinearly resized position embeddings, frozen; scales = hidden states -2, -11).
- `TimmVisionEncoder`: any timm model with `forward_intermediates` (ViTs and most CNNs).
"""

from __future__ import annotations

import abc
import contextlib
import importlib
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import CLIPVisionConfig, CLIPVisionModel


class VisionEncoder(nn.Module, abc.ABC):
    """Multi-scale vision encoder: image -> L feature maps on the patch grid.

    Subclasses set the attributes below in their constructor. A frozen encoder
    (`trainable = False`) has no parameter requiring grad, stays in eval mode whatever
    `train()` asks, and runs its forward under `torch.no_grad()` so no activations are kept.

    Attributes:
        out_channels: C of every returned map.
        num_scales: L, the number of returned maps.
        image_size: S, the expected square input side in pixels.
        grid_size: h == w of the returned maps.
        trainable: whether the encoder's weights are trained.
        unused_parameters: names (in this module) of parameters that never reach the returned maps,
            so never get a gradient; distributed training is told to ignore them.
    """

    out_channels: int
    num_scales: int
    image_size: int
    grid_size: int
    trainable: bool
    unused_parameters: tuple[str, ...] = ()

    @abc.abstractmethod
    def forward(self, pixel_values: Tensor, resized_sizes: Tensor | None = None) -> list[Tensor]:
        """pixel_values (B, 3, S, S) -> L tensors (B, C, h, w), scale 0 first.

        Scale 0 is the first requested layer (the deepest one used in the paper's setting,
        e.g. CLIP layer -2). ``resized_sizes`` (B, 2) is each image's (height, width) before its
        bottom/right padding, or None (no padding); an encoder may keep the padding out of its
        attention with it (``CLIPVisionEncoder`` does, as the release) or ignore it.
        """

    def train(self, mode: bool = True) -> VisionEncoder:
        """Sets train mode, except that a frozen encoder always stays in eval mode."""
        return super().train(mode and self.trainable)

    def _freeze_unless_trainable(self) -> None:
        """Makes a non-trainable encoder frozen; call at the end of `__init__`."""
        if not self.trainable:
            self.requires_grad_(False)
            self.eval()

    def _grad_context(self) -> contextlib.AbstractContextManager:
        """`torch.no_grad()` for a frozen encoder, a no-op context otherwise."""
        return contextlib.nullcontext() if self.trainable else torch.no_grad()

    def _check_input(self, pixel_values: Tensor) -> None:
        """Raises ValueError unless pixel_values is (B, 3, S, S)."""
        shape = tuple(pixel_values.shape)
        if len(shape) != 4 or shape[1] != 3 or shape[2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"{type(self).__name__} expects pixel_values of shape (B, 3, {self.image_size}, "
                f"{self.image_size}), got {shape}; resize/pad images to image_size={self.image_size}."
            )


def valid_cells(resized_sizes: Tensor, image_size: int, cells: int, patch_grid: int | None = None) -> Tensor:
    """(B, cells, cells) bool: the cells of a ``cells`` x ``cells`` grid over the (B, 3, S, S) input that
    lie on the image rather than on its bottom/right padding.

    As the release: the pixel mask resized by nearest-neighbour interpolation to the patch grid, and
    from there (``patch_grid``) again to the LLM's tokens. Cell i of n cells over m takes source
    floor(i m / n); a cell is valid when the pixel it ends up at is.

    Args:
        resized_sizes: (B, 2) each image's (height, width) before padding.
        image_size: S.
        cells: the grid side.
        patch_grid: the patch grid the cells are resized from; None: straight from the pixels.
    """
    index = torch.arange(cells, device=resized_sizes.device)  # (cells,)
    if patch_grid is None:
        first_pixel = index * image_size // cells
    else:
        first_pixel = (index * patch_grid // cells) * image_size // patch_grid
    rows = first_pixel[None] < resized_sizes[:, :1]  # (B, cells)
    columns = first_pixel[None] < resized_sizes[:, 1:]  # (B, cells)
    return rows[:, :, None] & columns[:, None, :]


def resolve_layers(feature_layers: list[int], num_entries: int, *, what: str) -> list[int]:
    """Turns possibly negative indices into a sequence of `num_entries` into absolute ones.

    Args:
        feature_layers: requested indices, Python-style (negative counts from the end).
        num_entries: length of the indexed sequence.
        what: description of the sequence for error messages.

    Returns:
        The absolute indices, in the requested order.

    Raises:
        ValueError: if the list is empty or an index is out of range.
    """
    if not feature_layers:
        raise ValueError(f"feature_layers is empty; give at least one index into {what}.")
    resolved = []
    for position, layer in enumerate(feature_layers):
        if not -num_entries <= layer < num_entries:
            raise ValueError(
                f"feature_layers[{position}] = {layer} is out of range for {what} "
                f"({num_entries} entries: valid indices are {-num_entries}..{num_entries - 1})."
            )
        resolved.append(layer % num_entries)
    return resolved


def interpolate_position_table(
    table: Tensor, grid_size: int, *, release_quirk: bool = False
) -> Tensor:
    """Bilinearly resizes a ViT position table [class row; g*g patch rows] to a new grid.

    Patch rows are row-major on a (g, g) grid and resized with bilinear interpolation,
    align_corners=False; the class row is kept as is. Identity when the grid is unchanged.

    With `release_quirk`, reproduces the released PixelLM resize exactly: it treats the LAST row
    as the class token, resizes rows [:-1] (which include the real class row) as the grid, and
    appends the last row at the end. Every position is then off by one; the released weights
    were trained with that table.

    Args:
        table: (1 + g*g, D) position embeddings, class row first.
        grid_size: G, the new grid side.
        release_quirk: reproduce the released code's off-by-one resize.

    Returns:
        (1 + G*G, D) table in the dtype of `table` (computed in float32).
    """
    num_rows, dim = table.shape
    old_grid = round((num_rows - 1) ** 0.5)
    if old_grid * old_grid != num_rows - 1:
        raise ValueError(f"position table has {num_rows} rows; expected 1 + g*g for a square grid.")
    if release_quirk:
        kept, grid_rows = table[-1:], table[:-1]  # (1, D), (g*g, D)
    else:
        kept, grid_rows = table[:1], table[1:]
    grid = grid_rows.float().T.reshape(1, dim, old_grid, old_grid)  # (1, D, g, g)
    if grid_size != old_grid:
        grid = F.interpolate(
            grid, size=(grid_size, grid_size), mode="bilinear", align_corners=False
        )
    grid_rows = grid.reshape(dim, grid_size * grid_size).T.to(table.dtype)  # (G*G, D)
    pieces = (grid_rows, kept) if release_quirk else (kept, grid_rows)
    return torch.cat(pieces, dim=0)  # (1 + G*G, D)


class CLIPVisionEncoder(VisionEncoder):
    """CLIP vision tower (`transformers.CLIPVisionModel`) returning hidden states as maps.

    Position embeddings are interpolated once, here, to the new grid, and the model's
    embedding table, `position_ids` buffer and config `image_size` are replaced, so the stock
    forward runs at `image_size` without `interpolate_pos_encoding`.

    Encoder layers deeper than the deepest requested hidden state are dropped at construction
    (they cannot change the returned maps); `model.config.num_hidden_layers` is updated to match.
    The final `post_layernorm` only touches the pooled class token, which no scale uses: it is kept (so
    checkpoints load) and listed in `unused_parameters`, as it never gets a gradient.

    Args:
        pretrained: local directory holding a `save_pretrained` CLIP checkpoint (a
            `CLIPVisionModel` or a full `CLIPModel`, e.g. openai/clip-vit-large-patch14-336).
        config: keyword arguments of `CLIPVisionConfig` for a randomly initialised model.
            Exactly one of `pretrained` and `config` must be given.
        image_size: input side S in pixels; None keeps the checkpoint's.
        feature_layers: indices into `hidden_states` (entry 0 = embeddings, entry i = output of
            layer i, so -2 is the penultimate layer's output), one per scale, scale 0 first.
        trainable: train the tower; False freezes it (no grad, eval mode, no stored activations).
        attn_implementation: "sdpa" or "eager".
        release_position_quirk: resize position embeddings with the released PixelLM
            off-by-one (see `interpolate_position_table`); needed to run released weights.
    """

    def __init__(
        self,
        *,
        pretrained: str | None = None,
        config: dict | None = None,
        image_size: int | None = None,
        feature_layers: list[int] = [-2, -11],  # noqa: B006 (read-only; a list for LightningCLI)
        trainable: bool = False,
        attn_implementation: str = "sdpa",
        release_position_quirk: bool = False,
    ) -> None:
        super().__init__()
        if (pretrained is None) == (config is None):
            raise ValueError(
                "CLIPVisionEncoder needs exactly one of `pretrained` (a local dir) and `config`."
            )
        model = (
            _load_clip(pretrained, attn_implementation)
            if pretrained is not None
            else CLIPVisionModel(
                CLIPVisionConfig(**config, attn_implementation=attn_implementation)
            )
        )
        depth = model.config.num_hidden_layers
        self.layers = resolve_layers(
            list(feature_layers),
            depth + 1,
            what=f"the hidden_states of a {depth}-layer CLIP vision model",
        )
        keep = max(self.layers)
        model.encoder.layers = model.encoder.layers[:keep]
        model.config.num_hidden_layers = keep

        patch = model.config.patch_size
        self.image_size = model.config.image_size if image_size is None else image_size
        if self.image_size % patch:
            raise ValueError(
                f"image_size={self.image_size} is not a multiple of the CLIP patch size {patch}."
            )
        self.grid_size = self.image_size // patch
        _resize_positions(model, self.image_size, release_quirk=release_position_quirk)

        self.model = model
        self.out_channels = model.config.hidden_size
        self.num_scales = len(self.layers)
        self.trainable = trainable
        self._freeze_unless_trainable()
        self.unused_parameters = ("model.post_layernorm.weight", "model.post_layernorm.bias")  # class token only

    def forward(self, pixel_values: Tensor, resized_sizes: Tensor | None = None) -> list[Tensor]:
        """pixel_values (B, 3, S, S) -> L maps (B, C, h, w), patch tokens only, row-major.

        With ``resized_sizes`` (B, 2), no token attends to a patch on the padding (a key-padding
        mask, as the release's padded CLIP); the padding patches' own features are still computed.
        """
        self._check_input(pixel_values)
        mask = {}
        if resized_sizes is not None:  # no check of the sizes here: it would wait for the GPU
            keys = valid_cells(resized_sizes, self.image_size, self.grid_size).flatten(1)  # (B, h*w)
            keys = F.pad(keys, (1, 0), value=True)  # (B, 1 + h*w), the class token first
            blocked = torch.zeros(keys.shape, dtype=self.model.dtype, device=keys.device)
            blocked = blocked.masked_fill(~keys, torch.finfo(self.model.dtype).min)
            mask["attention_mask"] = blocked[:, None, None, :]  # (B, 1, 1, 1 + h*w), additive
        with self._grad_context():
            hidden = self.model(pixel_values=pixel_values, output_hidden_states=True, **mask).hidden_states
            maps = []
            for layer in self.layers:
                tokens = hidden[layer][:, 1:]  # (B, h*w, C), class token dropped
                batch, _, channels = tokens.shape
                maps.append(
                    tokens.transpose(1, 2).reshape(batch, channels, self.grid_size, self.grid_size)
                )
        return maps


def _load_clip(directory: str, attn_implementation: str) -> CLIPVisionModel:
    """Loads a CLIP vision tower from a local directory; fails on missing weights."""
    if not Path(directory).is_dir():
        raise FileNotFoundError(
            f"CLIP checkpoint directory {directory!r} does not exist; pass a local directory written by "
            "save_pretrained (weights are never downloaded)."
        )
    model, info = CLIPVisionModel.from_pretrained(
        directory,
        local_files_only=True,
        attn_implementation=attn_implementation,
        output_loading_info=True,
        dtype=torch.float32,  # as every other part (see LlavaLMM): not the file's half precision
    )
    if info["missing_keys"]:
        raise ValueError(
            f"CLIP checkpoint {directory!r} lacks weights for: {sorted(info['missing_keys'])}."
        )
    return model


def _resize_positions(model: CLIPVisionModel, image_size: int, *, release_quirk: bool) -> None:
    """Replaces the position table, `position_ids` and config size of `model` for `image_size`."""
    embeddings = model.embeddings
    grid = image_size // embeddings.patch_size
    if grid * grid == embeddings.num_patches:
        return
    old = embeddings.position_embedding.weight.detach()  # (1 + g*g, C)
    new = interpolate_position_table(old, grid, release_quirk=release_quirk)  # (1 + G*G, C)
    embeddings.position_embedding = nn.Embedding.from_pretrained(new, freeze=False)
    embeddings.image_size = image_size
    embeddings.num_patches = grid * grid
    embeddings.num_positions = grid * grid + 1
    embeddings.position_ids = torch.arange(grid * grid + 1, device=old.device).expand(1, -1)
    model.config.image_size = image_size


class TimmVisionEncoder(VisionEncoder):
    """A timm backbone whose intermediate outputs (`forward_intermediates`) are the scales.

    Blocks deeper than the deepest requested one, the final norm and the head are pruned at
    construction (`prune_intermediate_layers`), after the checkpoint is loaded.

    Args:
        model_name: timm architecture name; weights are never downloaded.
        image_size: input side S in pixels.
        feature_layers: block indices (negative count from the last block), one per scale,
            scale 0 first; the output of block i is returned.
        trainable: train the backbone; False freezes it.
        model_kwargs: extra `timm.create_model` arguments (e.g. embed_dim, depth, patch_size).
        checkpoint: local weight file (.safetensors, or a torch.load-able state dict, read with
            weights_only=True), loaded strictly except for classifier weights. The model family's
            `checkpoint_filter_fn` is applied when it has one (e.g. ViT position resampling).
    """

    def __init__(
        self,
        *,
        model_name: str = "vit_base_patch16_224",
        image_size: int = 224,
        feature_layers: list[int] = [-2, -11],  # noqa: B006 (read-only; a list for LightningCLI)
        trainable: bool = True,
        model_kwargs: dict | None = None,
        checkpoint: str | None = None,
    ) -> None:
        super().__init__()
        kwargs = dict(model_kwargs or {})
        clash = {"pretrained", "img_size", "num_classes"} & kwargs.keys()
        if clash:
            raise ValueError(
                f"model_kwargs must not set {sorted(clash)}; TimmVisionEncoder sets them."
            )
        model = timm.create_model(
            model_name, pretrained=False, img_size=image_size, num_classes=0, **kwargs
        )
        if checkpoint is not None:
            _load_timm_checkpoint(model, checkpoint)
        info = model.feature_info
        self.layers = resolve_layers(
            list(feature_layers),
            len(info),
            what=f"the {len(info)} feature blocks of timm model {model_name!r}",
        )
        self._take = sorted(set(self.layers))  # forward_intermediates returns blocks in depth order
        widths = {info[i]["num_chs"] for i in self.layers}
        strides = {info[i]["reduction"] for i in self.layers}
        if len(widths) != 1 or len(strides) != 1:
            raise ValueError(
                f"feature_layers {list(feature_layers)} of {model_name!r} give channels {sorted(widths)} and "
                f"strides {sorted(strides)}; all scales must share one width and one grid."
            )
        model.prune_intermediate_layers(self._take, prune_norm=True, prune_head=True)

        self.model = model
        self.image_size = image_size
        self.grid_size = image_size // strides.pop()
        self.out_channels = widths.pop()
        self.num_scales = len(self.layers)
        self.trainable = trainable
        self._freeze_unless_trainable()

    def forward(self, pixel_values: Tensor, resized_sizes: Tensor | None = None) -> list[Tensor]:
        """pixel_values (B, 3, S, S) -> L maps (B, C, h, w), prefix tokens dropped; ``resized_sizes`` is
        not used (timm's ``forward_intermediates`` takes no key-padding mask)."""
        self._check_input(pixel_values)
        with self._grad_context():
            taken = self.model.forward_intermediates(
                pixel_values, indices=self._take, intermediates_only=True, output_fmt="NCHW"
            )  # len(self._take) x (B, C, h, w), in depth order
        by_block = dict(zip(self._take, taken, strict=True))
        return [by_block[layer] for layer in self.layers]


def _load_timm_checkpoint(model: nn.Module, path: str) -> None:
    """Loads a local weight file into a timm model; fails on missing or unexpected keys."""
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"timm checkpoint {path!r} does not exist; pass a local weight file."
        )
    state_dict = timm.models.load_state_dict(path, weights_only=True)  # safetensors or torch.load
    filter_fn = getattr(
        importlib.import_module(type(model).__module__), "checkpoint_filter_fn", None
    )
    if filter_fn is not None:
        state_dict = filter_fn(state_dict, model)
    classifiers = model.pretrained_cfg.get("classifier") or ()
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    result = model.load_state_dict(state_dict, strict=False)
    unexpected = [
        k for k in result.unexpected_keys if not k.startswith(tuple(f"{c}." for c in classifiers))
    ]
    if result.missing_keys or unexpected:
        raise ValueError(
            f"timm checkpoint {path!r} does not match {type(model).__name__}: missing "
            f"{result.missing_keys}, unexpected {unexpected}."
        )
