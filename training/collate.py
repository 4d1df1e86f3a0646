"""Manifest samples → SFT batches: chat rendering, image-pad expansion, left padding, labels.

Design decisions:

- Each sample becomes one chat: an optional system message, a user turn holding the image (or
  slide) placeholder followed by the prompt (the sample's own, else the task's default from
  :func:`smartpath.model.prompts.build_prompt`), and the assistant completion
  ``<think></think><answer>{target}</answer><|im_end|>``. SmartPath-R1's SFT data carries no
  chain of thought, so the think block is empty but present: the model learns the full output
  grammar the GRPO stage and the answer parsers expect.
- Prompt and completion are tokenized separately and concatenated, so the completion boundary
  is exact (no BPE merge can cross it); the loss covers the whole completion including the
  closing ``<|im_end|>`` (the model learns to stop) and nothing of the prompt
  (:func:`smartpath.training.objectives.answer_only_labels` with a completion mask).
- Rows are LEFT-padded with the tokenizer's pad token (what generation needs, and what
  ``SmartPathModel`` handles for training too); ``pixel_values``/``image_grid_thw`` are the
  batch's ROI images concatenated in request order (Qwen2.5-VL's packed layout).
- WSI samples are supported only with precomputed features passed as a
  :class:`~smartpath.model.mllm.SlideInput` (the collator never opens slides); pass
  ``slide_tokens`` (``model.slide_tokens``) to build such prompts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from smartpath.core.config.model import ModelConfig, VisionSizes
from smartpath.model.grammar import Scale, Task, format_completion
from smartpath.model.mllm import MultimodalBatch, SlideInput
from smartpath.model.prompts import PromptStyle, build_prompt
from smartpath.model.tokenizer import IM_END
from smartpath.model.vision import RoiInput, make_image_processor, prepare_roi, question_ids
from smartpath.training.manifest import RoiSample, WsiSample
from smartpath.training.objectives import answer_only_labels

__all__ = ["Collator", "sft_completion"]


def sft_completion(target: str) -> str:
    """The SFT assistant completion for a target: empty think block, answer, ``<|im_end|>``."""
    return format_completion("", target) + IM_END


class Collator:
    """Turn ``(sample, image or SlideInput)`` pairs into ``(MultimodalBatch, labels)``.

    ``vision`` is an image processor, a :class:`ModelConfig` or :class:`VisionSizes` (the
    processor is then built from its sizes). ``slide_tokens`` is the model's slide token budget
    (needed only for WSI samples); ``system_prompt`` None uses the chat template's default.
    """

    def __init__(
        self,
        vision: Qwen2VLImageProcessorPil | ModelConfig | VisionSizes,
        tokenizer: PreTrainedTokenizerBase,
        slide_tokens: int | None = None,
        *,
        system_prompt: str | None = None,
    ) -> None:
        self.prompt_style: PromptStyle = "full"
        if isinstance(vision, ModelConfig):
            self.prompt_style = vision.prompt_style
            vision = vision.vision
        if isinstance(vision, VisionSizes):
            vision = make_image_processor(vision)
        self.processor = vision
        self.tokenizer = tokenizer
        self.slide_tokens = slide_tokens
        self.system_prompt = system_prompt
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs a pad token for batching")
        self.pad_id = int(tokenizer.pad_token_id)

    def _text(self, sample: RoiSample | WsiSample) -> str:
        if sample.prompt is not None:
            return sample.prompt
        scale = Scale.ROI if isinstance(sample, RoiSample) else Scale.WSI
        task = Task[sample.task.upper()]
        return build_prompt(
            task, scale, labels=sample.labels, options=sample.options, style=self.prompt_style
        )

    def encode_prompt(
        self, sample: RoiSample | WsiSample, visual: np.ndarray | Image.Image | SlideInput
    ) -> tuple[list[int], RoiInput | None, SlideInput | None]:
        """(prompt token ids, ROI input or None, slide or None) of one sample."""
        roi: RoiInput | None = None
        slide: SlideInput | None = None
        if isinstance(sample, WsiSample):
            if not isinstance(visual, SlideInput):
                raise NotImplementedError(
                    f"WSI sample {sample.id!r}: the collator takes precomputed slide features "
                    "only (pass a SlideInput, not an image); reading slides is not implemented"
                )
            if self.slide_tokens is None:
                raise ValueError("WSI samples need Collator(..., slide_tokens=model.slide_tokens)")
            slide = visual
            prompt_ids = question_ids(
                self.tokenizer,
                self._text(sample),
                slide=True,
                visual_tokens=self.slide_tokens,
                system_prompt=self.system_prompt,
            )
        else:
            if isinstance(visual, SlideInput):
                raise TypeError(f"ROI sample {sample.id!r} needs an image, got a SlideInput")
            roi = prepare_roi(visual, self.processor)
            prompt_ids = question_ids(
                self.tokenizer,
                self._text(sample),
                slide=False,
                visual_tokens=roi.num_image_tokens,
                system_prompt=self.system_prompt,
            )
        return prompt_ids, roi, slide

    def encode(
        self, sample: RoiSample | WsiSample, visual: np.ndarray | Image.Image | SlideInput
    ) -> tuple[list[int], int, RoiInput | None, SlideInput | None]:
        """(token ids, completion length, ROI input or None, slide or None) of one sample."""
        prompt_ids, roi, slide = self.encode_prompt(sample, visual)
        completion_ids = self.tokenizer(sft_completion(sample.target), add_special_tokens=False)[
            "input_ids"
        ]
        return prompt_ids + list(completion_ids), len(completion_ids), roi, slide

    def __call__(
        self, samples: Sequence[tuple[RoiSample | WsiSample, np.ndarray | Image.Image | SlideInput]]
    ) -> tuple[MultimodalBatch, torch.Tensor]:
        """Left-padded batch and its answer-only labels (B, T) for ``samples``."""
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        return self._batch([s for s, _ in samples], [self.encode(s, v) for s, v in samples])

    def prompts(
        self, samples: Sequence[tuple[RoiSample | WsiSample, np.ndarray | Image.Image | SlideInput]]
    ) -> MultimodalBatch:
        """Left-padded prompts only (generation prompt included), for rollouts and evaluation."""
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        encoded = [(ids, 0, roi, slide) for ids, roi, slide in
                   (self.encode_prompt(s, v) for s, v in samples)]  # fmt: skip
        return self._batch([s for s, _ in samples], encoded)[0]

    def _batch(
        self,
        samples: Sequence[RoiSample | WsiSample],
        encoded: Sequence[tuple[list[int], int, RoiInput | None, SlideInput | None]],
    ) -> tuple[MultimodalBatch, torch.Tensor]:
        length = max(len(ids) for ids, *_ in encoded)
        bsz = len(encoded)
        input_ids = torch.full((bsz, length), self.pad_id, dtype=torch.long)
        attention = torch.zeros(bsz, length, dtype=torch.long)
        completion = torch.zeros(bsz, length, dtype=torch.bool)
        for i, (ids, n_completion, _, _) in enumerate(encoded):
            input_ids[i, length - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention[i, length - len(ids) :] = 1
            if n_completion:
                completion[i, length - n_completion :] = True
        labels = answer_only_labels(input_ids, completion, attention)
        rois = [roi for _, _, roi, _ in encoded if roi is not None]
        slides = [slide for *_, slide in encoded]
        scales = [Scale.ROI if isinstance(s, RoiSample) else Scale.WSI for s in samples]
        batch = MultimodalBatch(
            input_ids=input_ids,
            attention_mask=attention,
            task_ids=torch.tensor([int(Task[s.task.upper()]) for s in samples]),
            scale_ids=torch.tensor([int(s) for s in scales]),
            pixel_values=torch.cat([r.pixel_values for r in rois]) if rois else None,
            image_grid_thw=torch.cat([r.image_grid_thw for r in rois]) if rois else None,
            slides=slides if any(s is not None for s in slides) else None,
        )
        return batch, labels
