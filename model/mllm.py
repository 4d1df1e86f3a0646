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
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from smartpath.core.config.model import ModelConfig
from smartpath.model.aggregator import SlideAggregator
from smartpath.model.checkpoint import ExpertInfo, Manifest, load_checkpoint, save_checkpoint
from smartpath.model.experts import ExpertRouting, apply_routing, attach_experts
from smartpath.model.generation import generate_stream
from smartpath.model.grammar import Scale, Task
from smartpath.model.image_position import ImagePositionEmbedding
from smartpath.model.router import ExpertRouter, RouterOutput
from smartpath.model.tokenizer import IMAGE_PAD, SLIDE_PAD, VIDEO_PAD, VISION_END, VISION_START

IGNORE_INDEX = -100
PLACEHOLDER_TOKENS = (IMAGE_PAD, VIDEO_PAD, SLIDE_PAD, VISION_START, VISION_END)


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


@dataclass
class SmartPathOutput:
    """Logits (B, T, V), the LM loss when labels were given, and the router's decision."""

    logits: Tensor
    router: RouterOutput
    loss: Tensor | None = None
    aux_loss: Tensor | None = None


class SmartPathModel(nn.Module):
    """The SmartPath MLLM (see module docstring)."""

    def __init__(self, cfg: ModelConfig, base: nn.Module, tokenizer: Any) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.manifest: Manifest | None = None  # set by load()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        hidden = base.config.text_config.hidden_size
        self.image_token_id = base.config.image_token_id
        self.slide_token_id = tokenizer.convert_tokens_to_ids("<|slide_pad|>")
        e = cfg.experts
        self.expert_layers = attach_experts(base, e.target_modules, e.num_experts, e.rank, e.alpha)
        a = cfg.aggregator
        self.aggregator = SlideAggregator(
            a.feature_dim,
            hidden,
            hidden_dim=hidden,
            num_tokens=a.num_tokens,
            num_heads=a.num_heads,
            chunk_size=a.chunk_size,
        )
        self.router = ExpertRouter(
            num_tasks=max(Task) + 1,
            num_scales=max(Scale) + 1,
            visual_dim=hidden,
            num_experts=e.num_experts,
            top_k=e.top_k,
            hidden_dim=cfg.router.hidden_size,
        )
        self.image_position = ImagePositionEmbedding(hidden) if cfg.image_positions else None

    @property
    def slide_tokens(self) -> int:
        """``<|slide_pad|>`` tokens a prompt must hold per slide."""
        return self.aggregator.num_tokens

    def encode_images(self, pixel_values: Tensor, image_grid_thw: Tensor) -> Tensor:
        """The vision tower's tokens (image tokens, H) for packed ROI images."""
        images = self.base.model.get_image_features(pixel_values, image_grid_thw)
        tokens = torch.cat(images.pooler_output)  # (image tokens, H)
        if self.image_position is not None:
            merge = self.base.config.vision_config.spatial_merge_size
            tokens = tokens + self.image_position(image_grid_thw, merge).to(tokens.dtype)
        return tokens

    def slide_tokens_of(self, slide: SlideInput) -> Tensor:
        """The aggregator's slide tokens (M, H) for one slide's tile features."""
        return self.aggregator(slide.features, slide.coords, slide.mpp)

    def embed(self, batch: MultimodalBatch) -> tuple[Tensor, Tensor, Tensor]:
        """(inputs_embeds (B, T, H), position_ids (3, B, T), pooled visual (B, H))."""
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
        return self.router(batch.task_ids, batch.scale_ids, pooled)

    def forward(
        self,
        batch: MultimodalBatch,
        labels: Tensor | None = None,
        routing: ExpertRouting | None = None,
    ) -> SmartPathOutput:
        """Logits for the batch; with ``labels`` (B, T, IGNORE_INDEX outside answers) the loss.

        ``routing`` overrides the router (e.g. to force an expert in tests or SFT).
        """
        embeds, positions, pooled = self.embed(batch)
        decision = self.route(batch, pooled)
        if routing is None:
            # Gate weights stay attached so the LM loss trains the router too.
            routing = ExpertRouting(decision.indices, decision.weights)
        with apply_routing(self.base, routing):
            out = self.base(
                inputs_embeds=embeds,
                attention_mask=batch.attention_mask,
                position_ids=positions,
                use_cache=False,
            )
        result = SmartPathOutput(logits=out.logits, router=decision)
        if labels is not None:
            shift_logits = out.logits[:, :-1].flatten(0, 1)  # (B·(T-1), V)
            shift_labels = labels[:, 1:].flatten()  # (B·(T-1),)
            result.loss = F.cross_entropy(
                shift_logits.float(), shift_labels, ignore_index=IGNORE_INDEX
            )
            result.aux_loss = self.cfg.router.load_balance_weight * self.router.aux_loss(decision)
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
    ) -> Iterator[tuple[int, int]]:
        """Yield (request index, token id) for a left-padded batch, each request with the
        experts its router picked (or ``routing``), prefilled with its image/slide inputs.
        Visual placeholder tokens are never generated; ``cancelled`` drops requests early
        (see :func:`smartpath.model.generation.generate_stream`)."""
        mask = batch.attention_mask.bool()
        if bool((mask[:, 1:].int() - mask[:, :-1].int() < 0).any()):
            raise ValueError("generation needs left padding (attention_mask 0…0 1…1 per row)")
        embeds, positions, pooled = self.embed(batch)
        if routing is None:
            routing = self.route(batch, pooled).routing()
        prompts = [row[m].tolist() for row, m in zip(batch.input_ids, mask, strict=True)]
        placeholders = self.tokenizer.convert_tokens_to_ids(list(PLACEHOLDER_TOKENS))
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
            pad_token_id=int(batch.input_ids[~mask].flatten()[0]) if (~mask).any() else 0,
            suppress_token_ids=placeholders,
            prefill_embeds=embeds,
            prefill_positions=positions,
            cancelled=cancelled,
        )

    def generate(self, batch: MultimodalBatch, **kwargs) -> list[list[int]]:
        """Every request's new tokens (see :meth:`generate_stream` for the arguments)."""
        outputs: list[list[int]] = [[] for _ in range(batch.input_ids.shape[0])]
        for row, token in self.generate_stream(batch, **kwargs):
            outputs[row].append(token)
        return outputs

    # -- checkpoints ---------------------------------------------------------------------
    def checkpoint_tensors(self) -> dict[str, Tensor]:
        """What a checkpoint stores: everything for a built preset; only SmartPath's own
        parameters (experts, aggregator, router) when the base comes from ``cfg.base_path``."""
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
        return tensors

    def save(
        self,
        dest: str | Path,
        store: Any = None,
        *,
        metrics: Mapping[str, float] | None = None,
        overwrite: bool = False,
    ) -> Manifest:
        """Write a SmartPath checkpoint (safetensors + manifest) to a folder or ``s3://``."""
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
    def load(cls, src: str | Path, store: Any = None) -> SmartPathModel:
        """Rebuild a model saved with :meth:`save` (never unpickles)."""
        from smartpath.model.base import base_from_config, load_base
        from smartpath.model.tokenizer import load_tokenizer

        tensors, manifest, tokenizer_dir = load_checkpoint(src, store)
        cfg = manifest.model
        tokenizer = load_tokenizer(tokenizer_dir)
        if cfg.base_path is not None:
            base, _ = load_base(cfg.base_path, cfg, store=store)
        else:
            base, _ = base_from_config(cfg, tokenizer)
        model = cls(cfg, base, tokenizer)
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        expected_missing = set(model.state_dict()) - set(model.checkpoint_tensors())
        if unexpected or set(missing) - expected_missing:
            raise ValueError(
                f"checkpoint does not fit {cfg.preset}: missing {sorted(set(missing))[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}"
            )
        model.manifest = manifest
        return model.eval()
