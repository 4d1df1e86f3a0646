"""SmartPathModel: the Qwen2.5-VL base with a slide aggregator, an expert router and
mixture-of-LoRA experts, composed into one module.

Design decisions:
- The base model stays a stock ``Qwen2_5_VLForConditionalGeneration`` (frozen), so real
  checkpoints load unchanged; SmartPath's parts sit beside it: the slide aggregator, the
  router, and MixtureLoRALinear layers swapped into the LM's target projections.
- Inputs are embedded here: text embeddings, ROI image features (the base's own vision tower)
  at ``<|image_pad|>`` tokens, aggregated slide tokens at ``<|slide_pad|>`` tokens; then the
  base runs on ``inputs_embeds`` with Qwen's 3-D (M-RoPE) positions computed from the ids.
  Slide tokens take ordinary 1-D text positions (their layout is in the aggregator's encoding).
- With ``cfg.image_positions``, ROI image tokens also carry learnt absolute 2-D positions
  (``image_position.py``), added in :meth:`encode_images`.
- The router sees the task, the scale and the mean of the request's visual tokens; its top-k
  gate becomes the per-request ExpertRouting for the whole forward pass. Its load-balancing
  loss is returned, scaled, beside the LM loss.
- Generation prefills from these embeddings: :meth:`SmartPathModel.generate_stream` decodes a
  static batch; :meth:`SmartPathModel.decode_batch` + :meth:`SmartPathModel.join` serve
  continuous batching (a group, prefilled with its images/slides, joins a running batch).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from smartpath.core.config.model import ModelConfig
from smartpath.model.aggregator import SlideAggregator
from smartpath.model.base import BasePart, fit_embeddings
from smartpath.model.checkpoint import ExpertInfo, Manifest, load_checkpoint, save_checkpoint
from smartpath.model.constrained import Constraint, GrammarTokenizer
from smartpath.model.devices import resolve_device, resolve_dtype
from smartpath.model.experts import ExpertRouting, apply_routing, attach_experts
from smartpath.model.generation import DecodeBatch, generate_stream
from smartpath.model.grammar import Scale, Task
from smartpath.model.image_position import ImagePositionEmbedding
from smartpath.model.router import ExpertRouter, RouterOutput
from smartpath.model.tokenizer import (
    IM_END,
    IMAGE_PAD,
    SLIDE_PAD,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
    prepare_tokenizer,
    token_ids,
)

IGNORE_INDEX = -100
PLACEHOLDER_TOKENS = (IMAGE_PAD, VIDEO_PAD, SLIDE_PAD, VISION_START, VISION_END)

ModelPart = Literal["vision", "language", "router"]
MODEL_PARTS: tuple[ModelPart, ...] = ("vision", "language", "router")
"""What a service loads: ``vision`` = the base's vision tower, image positions and the slide
aggregator (the encoder); ``language`` = the base's language model with the LoRA experts (the
decoder); ``router`` = the expert router alone."""
# State-dict prefixes of each part (LoRA experts live inside the language model).
PART_PREFIXES: dict[str, tuple[str, ...]] = {
    "vision": ("base.model.visual.", "aggregator.", "image_position."),
    "language": ("base.model.language_model.", "base.lm_head.", "vocab_extension."),
    "router": ("router.",),
}


def make_aggregator(cfg: ModelConfig) -> SlideAggregator:
    """The slide aggregator of ``cfg``: tile features → LM-width slide tokens."""
    a, hidden = cfg.aggregator, cfg.text.hidden_size
    return SlideAggregator(
        a.feature_dim,
        hidden,
        hidden_dim=hidden,
        num_tokens=a.num_tokens,
        num_heads=a.num_heads,
        chunk_size=a.chunk_size,
    )


def make_router(cfg: ModelConfig) -> ExpertRouter:
    """The expert router of ``cfg``: task + scale + pooled visual tokens → top-k experts."""
    return ExpertRouter(
        num_tasks=max(Task) + 1,
        num_scales=max(Scale) + 1,
        visual_dim=cfg.text.hidden_size,
        num_experts=cfg.experts.num_experts,
        top_k=cfg.experts.top_k,
        hidden_dim=cfg.router.hidden_size,
    )


@dataclass
class SlideInput:
    """One slide's tile features (N, D), level-0 tile coordinates (N, 2) and µm/px."""

    features: Tensor
    coords: Tensor
    mpp: float = 1.0


@dataclass
class MultimodalBatch:
    """A batch of requests: token ids with image/slide placeholders, and their visual inputs.

    ``pixel_values``/``image_grid_thw`` hold every ROI image of the batch in request order
    (Qwen2.5-VL's packed layout); ``image_embeds`` may replace ``pixel_values`` with the vision
    tower's output computed elsewhere (:meth:`SmartPathModel.encode_images`, e.g. by the encoder
    service). ``slides[i]`` is request i's slide, its aggregated tokens
    (:meth:`SmartPathModel.slide_tokens_of`), or None.
    """

    input_ids: Tensor  # (B, T)
    attention_mask: Tensor  # (B, T) 1 = real token
    task_ids: Tensor  # (B,) smartpath Task values
    scale_ids: Tensor  # (B,) smartpath Scale values
    pixel_values: Tensor | None = None  # (patches, C·t·p·p)
    image_grid_thw: Tensor | None = None  # (images, 3)
    slides: Sequence[SlideInput | Tensor | None] | None = None
    image_embeds: Tensor | None = None  # (image tokens, H), instead of pixel_values

    def to(self, device: torch.device) -> MultimodalBatch:
        """The batch with every tensor on ``device`` (itself when they all are there)."""

        def move(t: Any) -> Any:
            if isinstance(t, Tensor):
                return t.to(device, non_blocking=True)
            if isinstance(t, SlideInput):
                return replace(t, features=move(t.features), coords=move(t.coords))
            return t

        return MultimodalBatch(
            input_ids=move(self.input_ids),
            attention_mask=move(self.attention_mask),
            task_ids=move(self.task_ids),
            scale_ids=move(self.scale_ids),
            pixel_values=move(self.pixel_values),
            image_grid_thw=move(self.image_grid_thw),
            slides=None if self.slides is None else [move(x) for x in self.slides],
            image_embeds=move(self.image_embeds),
        )


@dataclass
class SmartPathOutput:
    """Logits (B, T, V), the LM loss when labels were given, and the router's decision."""

    logits: Tensor
    router: RouterOutput | None  # None for a model loaded without its router part
    loss: Tensor | None = None
    aux_loss: Tensor | None = None


class SmartPathModel(nn.Module):
    """The SmartPath MLLM (see module docstring)."""

    def __init__(
        self,
        cfg: ModelConfig,
        base: nn.Module,
        tokenizer: Any,
        parts: Sequence[ModelPart] = MODEL_PARTS,
        device: torch.device | str | None = None,
    ) -> None:
        """``base`` holds the base parts that ``parts`` need (see :data:`MODEL_PARTS`);
        SmartPath's own parts are created for ``parts`` only, on ``device`` (default: the
        base's, or ``cfg.device`` for a base without parameters, as for the router) in the
        base's dtype (``cfg.dtype`` for a base on the meta device, whose weights are never
        read: :func:`smartpath.model.initialize.init_checkpoint`)."""
        super().__init__()
        unknown = set(parts) - set(MODEL_PARTS)
        if unknown:
            raise ValueError(f"unknown model parts {sorted(unknown)}; choose from {MODEL_PARTS}")
        self.cfg = cfg
        self.parts = tuple(p for p in MODEL_PARTS if p in parts)
        self.tokenizer = tokenizer
        self.manifest: Manifest | None = None  # set by load()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        prepare_tokenizer(tokenizer)
        self.slide_token_id = token_ids(tokenizer, [SLIDE_PAD])[SLIDE_PAD]
        self.image_token_id = base.config.image_token_id
        hidden = base.config.text_config.hidden_size
        self.hidden_size = int(hidden)
        self.vocab_extension = 0  # embedding rows added for tokens past the base's vocabulary
        self._grammar: GrammarTokenizer | None = None  # built on the first constrained batch
        self.expert_layers: list[str] = []
        self.aggregator: SlideAggregator | None = None
        self.image_position: ImagePositionEmbedding | None = None
        self.router: ExpertRouter | None = None
        base_param = next(base.parameters(), None)
        if device is not None or base_param is None:
            self._device = resolve_device(device or cfg.device)
        else:
            self._device = base_param.device
        dtype = base_param.dtype if base_param is not None and not base_param.is_meta else None
        dtype = dtype or resolve_dtype(cfg.dtype, self._device)
        e = cfg.experts
        if "language" in self.parts:
            self.vocab_extension = fit_embeddings(base, tokenizer)
            self.expert_layers = attach_experts(
                base, e.target_modules, e.num_experts, e.rank, e.alpha, dtype, device=self._device
            )
        if "vision" in self.parts:
            self.aggregator = make_aggregator(cfg)
            if cfg.image_positions:
                self.image_position = ImagePositionEmbedding(hidden)
        if "router" in self.parts:
            self.router = make_router(cfg)
        for name, param in self.named_parameters():
            if not name.startswith("base.") or ".lora_" in name:
                param.data = param.data.to(self._device, dtype)
        for module in (self.aggregator, self.image_position):
            if module is not None:
                module.to(self._device)

    @property
    def device(self) -> torch.device:
        """Where the model's parameters live; inputs are moved here."""
        return self._device

    def _part(self, part: ModelPart) -> None:
        if part not in self.parts:
            raise RuntimeError(
                f"this model holds only {list(self.parts)}; the {part!r} part was not loaded "
                "(load it with SmartPathModel.load(..., parts=...))"
            )

    @property
    def slide_tokens(self) -> int:
        """``<|slide_pad|>`` tokens a prompt must hold per slide."""
        return self.cfg.aggregator.num_tokens

    def encode_images(self, pixel_values: Tensor, image_grid_thw: Tensor) -> Tensor:
        """The vision tower's tokens (image tokens, H) for packed ROI images."""
        self._part("vision")
        pixel_values = pixel_values.to(self.device)
        image_grid_thw = image_grid_thw.to(self.device)
        images = self.base.model.get_image_features(pixel_values, image_grid_thw)
        tokens = torch.cat(images.pooler_output)  # (image tokens, H)
        if self.image_position is not None:
            merge = self.base.config.vision_config.spatial_merge_size
            tokens = tokens + self.image_position(image_grid_thw, merge).to(tokens.dtype)
        return tokens

    def slide_tokens_of(self, slide: SlideInput) -> Tensor:
        """The aggregator's slide tokens (M, H) for one slide's tile features."""
        self._part("vision")
        features = slide.features.to(self.device)
        return self.aggregator(features, slide.coords.to(self.device), slide.mpp)

    def tile_attention_of(self, slide: SlideInput) -> Tensor:
        """Each tile's share (N,) of the aggregator's attention: the slide answer's evidence."""
        self._part("vision")
        features = slide.features.to(self.device)
        return self.aggregator.tile_attention(features, slide.coords.to(self.device), slide.mpp)

    def embed(self, batch: MultimodalBatch) -> tuple[Tensor, Tensor, Tensor]:
        """(inputs_embeds (B, T, H), position_ids (3, B, T), pooled visual (B, H))."""
        self._part("language")
        batch = batch.to(self.device)
        ids = batch.input_ids
        embeds = self.base.get_input_embeddings()(ids)  # (B, T, H)
        b, _, h = embeds.shape
        pooled = embeds.new_zeros(b, h)
        counts = embeds.new_zeros(b, 1)
        image_mask = ids == self.image_token_id  # (B, T)
        image_embeds = batch.image_embeds
        if image_embeds is None and batch.pixel_values is not None:
            image_embeds = self.encode_images(batch.pixel_values, batch.image_grid_thw)
        if image_embeds is not None:
            image_embeds = image_embeds.to(embeds.dtype)  # (n_img_tok, H)
            if int(image_mask.sum()) != image_embeds.shape[0]:
                raise ValueError(
                    f"{int(image_mask.sum())} <|image_pad|> tokens for "
                    f"{image_embeds.shape[0]} image features; expand the prompt's image pads"
                )
            embeds = embeds.masked_scatter(image_mask[..., None], image_embeds)
            pooled = pooled + (image_mask[..., None] * embeds).sum(1)
            counts = counts + image_mask.sum(1, keepdim=True)
        slide_mask = ids == self.slide_token_id  # (B, T)
        if any(s is not None for s in batch.slides or ()):
            embeds = embeds.clone()  # written per request below
        for i, slide in enumerate(batch.slides or ()):
            if slide is None:
                continue
            tokens = slide if isinstance(slide, Tensor) else self.slide_tokens_of(slide)  # (M, H)
            row = slide_mask[i]
            if int(row.sum()) != tokens.shape[0]:
                raise ValueError(
                    f"request {i} has {int(row.sum())} <|slide_pad|> tokens; a slide needs "
                    f"{tokens.shape[0]}"
                )
            embeds[i, row] = tokens.to(embeds.dtype)
            pooled[i] = pooled[i] + tokens.sum(0)
            counts[i] = counts[i] + tokens.shape[0]
        pooled = pooled / counts.clamp_min(1)
        mm_types = image_mask.int()  # 1 = image token; slide tokens count as text (0)
        if batch.image_grid_thw is not None:
            positions, _ = self.base.model.get_rope_index(
                ids,
                mm_types,
                image_grid_thw=batch.image_grid_thw,
                attention_mask=batch.attention_mask,
            )
        else:
            pos = (batch.attention_mask.long().cumsum(-1) - 1).clamp_min(0)  # (B, T)
            positions = pos[None].expand(3, -1, -1)
        return embeds, positions, pooled

    def route(self, batch: MultimodalBatch, pooled: Tensor) -> RouterOutput:
        """The router's top-k decision per request."""
        self._part("router")
        return self.router(batch.task_ids.to(self.device), batch.scale_ids.to(self.device), pooled)

    def forward(
        self,
        batch: MultimodalBatch,
        labels: Tensor | None = None,
        routing: ExpertRouting | None = None,
        logits_to_keep: int = 0,
    ) -> SmartPathOutput:
        """Logits for the batch; with ``labels`` (B, T, IGNORE_INDEX outside answers) the loss.

        ``routing`` overrides the router (e.g. to force an expert in tests or SFT; a model
        without the router part needs it). ``logits_to_keep`` > 0 projects only the last that
        many positions onto the vocabulary (scoring short completions without (B, T, V)).
        """
        batch = batch.to(self.device)  # once: embed() finds it in place
        embeds, positions, pooled = self.embed(batch)
        needs_router = self.router is not None or routing is None
        decision = self.route(batch, pooled) if needs_router else None
        if routing is None:
            # Gate weights stay attached so the LM loss trains the router too.
            routing = ExpertRouting(decision.indices, decision.weights)
        with apply_routing(self.base, routing):
            out = self.base(
                inputs_embeds=embeds,
                attention_mask=batch.attention_mask,
                position_ids=positions,
                use_cache=False,
                logits_to_keep=logits_to_keep,
            )
        result = SmartPathOutput(logits=out.logits, router=decision)
        if labels is not None:
            if logits_to_keep:
                raise ValueError("the loss needs every position's logits (logits_to_keep=0)")
            labels = labels.to(self.device)
            shift_logits = out.logits[:, :-1].flatten(0, 1)  # (B·(T-1), V)
            shift_labels = labels[:, 1:].flatten()  # (B·(T-1),)
            result.loss = F.cross_entropy(
                shift_logits.float(), shift_labels, ignore_index=IGNORE_INDEX
            )
            if decision is not None:
                weight = self.cfg.router.load_balance_weight
                result.aux_loss = weight * self.router.aux_loss(decision)
        return result

    @torch.no_grad()
    def generate_stream(
        self,
        batch: MultimodalBatch,
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_token_ids: Sequence[int] = (),
        eos_token_id: int | None = None,
        routing: ExpertRouting | Sequence[ExpertRouting] | None = None,
        cancelled: Callable[[int], bool] | None = None,
        constraints: Sequence[Constraint | None] | None = None,
    ) -> Iterator[tuple[int, int]]:
        """Yield (request index, token id) for a left-padded batch, each request with the
        experts its router picked (or ``routing``), prefilled with its image/slide inputs.
        Visual placeholder tokens are never generated; ``cancelled`` drops requests early
        (see :func:`smartpath.model.generation.generate_stream`); ``constraints`` (one per
        request, None for free text) keep each completion within its task's grammar."""
        prompts, routing, embeds, positions, pad = self._prefill(batch, routing)
        yield from generate_stream(
            self.base,
            prompts,
            routing,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop_token_ids=stop_token_ids,
            eos_token_id=eos_token_id,
            pad_token_id=pad,
            suppress_token_ids=self._placeholder_ids(),
            prefill_embeds=embeds,
            prefill_positions=positions,
            cancelled=cancelled,
            grammar=self.grammar.batch(constraints) if constraints else None,
        )

    def _placeholder_ids(self) -> list[int]:
        vocab = self.tokenizer.get_vocab()
        return [vocab[t] for t in PLACEHOLDER_TOKENS if t in vocab]

    def _prefill(
        self, batch: MultimodalBatch, routing: ExpertRouting | Sequence[ExpertRouting] | None
    ) -> tuple[list[list[int]], Any, Tensor, Tensor, int]:
        """(prompts without padding, routing, prefill embeds, M-RoPE positions, pad id)."""
        mask = batch.attention_mask.bool()
        if bool((mask[:, 1:].int() - mask[:, :-1].int() < 0).any()):
            raise ValueError("generation needs left padding (attention_mask 0…0 1…1 per row)")
        embeds, positions, pooled = self.embed(batch)
        if routing is None:
            routing = self.route(batch, pooled).routing()
        prompts = [row[m].tolist() for row, m in zip(batch.input_ids, mask, strict=True)]
        pad = int(batch.input_ids[~mask].flatten()[0]) if (~mask).any() else 0
        return prompts, routing, embeds, positions, pad

    def decode_batch(
        self,
        *,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_token_ids: Sequence[int] = (),
        eos_token_id: int | None = None,
    ) -> DecodeBatch:
        """An empty running batch over the language model (continuous batching): requests join
        it with :meth:`join`, then step it (see :class:`~smartpath.model.generation.DecodeBatch`);
        visual placeholder tokens are never generated."""
        self._part("language")
        return DecodeBatch(
            self.base,
            top_p=top_p,
            seed=seed,
            stop_token_ids=stop_token_ids,
            eos_token_id=eos_token_id,
            pad_token_id=int(self.tokenizer.pad_token_id or 0),
            suppress_token_ids=self._placeholder_ids(),
        )

    @torch.no_grad()
    def join(
        self,
        running: DecodeBatch,
        keys: Sequence[Hashable],
        batch: MultimodalBatch,
        *,
        max_new_tokens: int | Sequence[int],
        temperature: float | Sequence[float] = 0.0,
        routing: ExpertRouting | Sequence[ExpertRouting] | None = None,
        constraints: Sequence[Constraint | None] | None = None,
    ) -> list[tuple[Hashable, int]]:
        """Prefill a left-padded group of requests (image/slide inputs in place) and merge it
        into ``running``; returns each request's first token as ``(key, token)``."""
        prompts, routing, embeds, positions, _ = self._prefill(batch, routing)
        return running.add(
            keys,
            prompts,
            routing,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            prefill_embeds=embeds,
            prefill_positions=positions,
            grammar=self.grammar.batch(constraints) if constraints else None,
        )

    @property
    def grammar(self) -> GrammarTokenizer:
        """The tokenizer prepared for constrained decoding over this model's vocabulary (the
        LM head's rows), ending at ``<|im_end|>``; built on first use (~0.2 s at 151k ids)."""
        if self._grammar is None:
            self._part("language")
            self._grammar = GrammarTokenizer(
                self.tokenizer,
                self.base.get_output_embeddings().weight.shape[0],
                token_ids(self.tokenizer, [IM_END])[IM_END],
            )
        return self._grammar

    def generate(self, batch: MultimodalBatch, **kwargs) -> list[list[int]]:
        """Every request's new tokens (see :meth:`generate_stream` for the arguments)."""
        outputs: list[list[int]] = [[] for _ in range(batch.input_ids.shape[0])]
        for row, token in self.generate_stream(batch, **kwargs):
            outputs[row].append(token)
        return outputs

    # -- checkpoints ---------------------------------------------------------------------
    def checkpoint_tensors(self) -> dict[str, Tensor]:
        """What a checkpoint stores: everything for a built preset; only SmartPath's own
        parameters (experts, aggregator, router, and any embedding rows it added) when the base
        comes from ``cfg.base_path``."""
        seen: set[int] = set()
        tensors: dict[str, Tensor] = {}
        for name, tensor in self.state_dict().items():
            own = not name.startswith("base.") or ".lora_" in name
            if self.cfg.base_path is not None and not own:
                continue
            if tensor.data_ptr() in seen:  # tied weights (lm_head = embed_tokens) once
                continue
            seen.add(tensor.data_ptr())
            tensors[name] = tensor.detach().contiguous()
        if self.cfg.base_path is not None and self.vocab_extension:
            tensors.update(self._extension_rows())
        return tensors

    def _extension_rows(self) -> dict[str, Tensor]:
        """Views of the embedding (and untied LM head) rows added past the base's vocabulary."""
        n = self.vocab_extension
        rows = {"vocab_extension.embed_tokens": self.base.get_input_embeddings().weight[-n:]}
        if not self.base.config.tie_word_embeddings:
            rows["vocab_extension.lm_head"] = self.base.lm_head.weight[-n:]
        return {k: v.detach() for k, v in rows.items()}

    def save(
        self,
        dest: str | Path,
        store: Any = None,
        *,
        metrics: Mapping[str, float] | None = None,
        overwrite: bool = False,
    ) -> Manifest:
        """Write a SmartPath checkpoint (safetensors + manifest) to a folder or ``s3://``."""
        if self.parts != MODEL_PARTS:
            raise RuntimeError(f"a model loaded with parts {list(self.parts)} cannot be saved")
        manifest = Manifest(
            model=self.cfg,
            experts=[
                ExpertInfo(name=f"expert-{e}", index=e) for e in range(self.cfg.experts.num_experts)
            ],
            metrics=dict(metrics or {}),
        )
        return save_checkpoint(
            dest, self.checkpoint_tensors(), manifest, self.tokenizer, store, overwrite=overwrite
        )

    @classmethod
    def load(
        cls,
        src: str | Path,
        store: Any = None,
        *,
        parts: Sequence[ModelPart] = MODEL_PARTS,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
    ) -> SmartPathModel:
        """Rebuild a model saved with :meth:`save` (never unpickles), with only ``parts``, on
        ``device`` in ``dtype`` (default: the checkpoint config's, "auto" resolved here)."""
        from smartpath.model.base import base_from_config
        from smartpath.model.tokenizer import load_tokenizer

        tensors, manifest, tokenizer_dir = load_checkpoint(src, store)
        cfg = manifest.model
        device = resolve_device(device or cfg.device)
        dtype = resolve_dtype(dtype or cfg.dtype, device)
        tokenizer = load_tokenizer(tokenizer_dir)
        base_parts: list[BasePart] = [p for p in ("vision", "language") if p in parts]
        base, _ = base_from_config(
            cfg, tokenizer, store=store, parts=base_parts, device=device, dtype=dtype
        )
        model = cls(cfg, base, tokenizer, parts, device=device)
        dropped = tuple(
            prefix
            for part in MODEL_PARTS
            if part not in model.parts
            for prefix in PART_PREFIXES[part]
        )
        tensors = {k: v for k, v in tensors.items() if not k.startswith(dropped)}
        extension = {k: tensors.pop(k) for k in list(tensors) if k.startswith("vocab_extension.")}
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        expected_missing = set(model.state_dict()) - set(model.checkpoint_tensors())
        if unexpected or set(missing) - expected_missing:
            raise ValueError(
                f"checkpoint does not fit {cfg.preset}: missing {sorted(set(missing))[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}"
            )
        rows = model._extension_rows() if model.vocab_extension and cfg.base_path else {}
        if set(extension) != set(rows):
            raise ValueError(
                f"checkpoint has embedding rows {sorted(extension)} for a model that adds "
                f"{sorted(rows)}: its tokenizer and its base do not belong together"
            )
        with torch.no_grad():
            for name, view in rows.items():
                view.copy_(extension[name])
        model.manifest = manifest
        return model.eval()
