"""A question to the model: task, scale, the caller's prompt, candidate labels and options.

Validated once at the gateway (cheap, before any slide is read) and turned into the model's
instruction text by the decoder with the same code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from smartpath.core.errors import InvalidArgumentError
from smartpath.model.grammar import Scale, Task, coerce_scale, coerce_task, task_scale_key
from smartpath.model.prompts import PromptStyle, build_prompt


@dataclass(frozen=True)
class Question:
    """What the caller asks (see ``smartpath.v1.Question``)."""

    task: Task
    scale: Scale
    prompt: str = ""
    labels: tuple[str, ...] = ()
    options: tuple[str, ...] = ()
    max_new_tokens: int = 0

    @property
    def key(self) -> str:
        """``"classification/roi"`` …: the task/scale key of defaults and metrics."""
        return task_scale_key(self.task, self.scale)

    def effective_labels(self, defaults: Mapping[str, Sequence[str]]) -> tuple[str, ...]:
        """The caller's labels, else the configured defaults for this task and scale."""
        return self.labels or tuple(defaults.get(self.key, ()))

    def text(self, defaults: Mapping[str, Sequence[str]], style: PromptStyle = "full") -> str:
        """The model's instruction text in its prompt ``style``; INVALID_ARGUMENT when the
        question cannot be asked."""
        try:
            return build_prompt(
                self.task,
                self.scale,
                question=self.prompt or None,
                labels=self.effective_labels(defaults) or None,
                options=self.options or None,
                style=style,
            )
        except ValueError as e:
            raise InvalidArgumentError(str(e)) from None


def parse_task(value: int) -> Task:
    """The Task of a proto enum value; INVALID_ARGUMENT for unspecified or unknown ones."""
    try:
        return coerce_task(value)
    except ValueError as e:
        raise InvalidArgumentError(str(e)) from None


def parse_scale(value: int) -> Scale:
    """The Scale of a proto enum value; INVALID_ARGUMENT for unspecified or unknown ones."""
    try:
        return coerce_scale(value)
    except ValueError as e:
        raise InvalidArgumentError(str(e)) from None


def make_question(
    task: int,
    scale: Scale,
    prompt: str,
    labels: Sequence[str],
    options: Sequence[str],
    max_new_tokens: int,
    *,
    max_prompt_chars: int,
    max_new_tokens_cap: int,
) -> Question:
    """A validated Question from request fields (proto enums are plain ints)."""
    if len(prompt) > max_prompt_chars:
        raise InvalidArgumentError(
            f"prompt is {len(prompt)} characters; the limit is {max_prompt_chars}"
        )
    if max_new_tokens < 0 or max_new_tokens > max_new_tokens_cap:
        raise InvalidArgumentError(
            f"max_new_tokens={max_new_tokens} must be in [0, {max_new_tokens_cap}] (0: default)"
        )
    for what, values in (("labels", labels), ("options", options)):
        if sum(len(v) for v in values) > max_prompt_chars:
            raise InvalidArgumentError(f"{what} exceed the prompt limit of {max_prompt_chars}")
    return Question(
        task=parse_task(task),
        scale=scale,
        prompt=prompt,
        labels=tuple(labels),
        options=tuple(options),
        max_new_tokens=max_new_tokens or max_new_tokens_cap,
    )
