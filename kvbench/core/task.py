"""The task contract: a task yields samples and names a metric; the engine runs the model.

A task never touches the model. It turns its data into :class:`Sample` objects (one context, one or
more questions about it, the references) and names the metric that scores a prediction. The engine
puts the prompt in the form the task declares and the model allows (``Sample.chat_template``),
prefills the context, compresses it and answers every question.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Iterator

from transformers import PreTrainedTokenizerBase

from kvbench.core.registry import Registry


@dataclass
class Question:
    question_id: str
    text: str  # appended after the context: the part the model has not seen when it compresses
    references: list[str]
    answer_prefix: str = ""  # put after the assistant turn's start, so the answer begins in place


@dataclass
class Sample:
    sample_id: str
    subtask: str
    context: str  # what gets compressed
    questions: list[Question]
    metric: str  # a name in kvbench.tasks.metrics.METRICS
    max_new_tokens: int
    # The task's prompt form. True: context + question inside the model's chat template, the answer
    # prefix after the assistant header. A base model has no chat template (base-model aliases drop
    # theirs), so there the sample takes its plain form, context + question + answer prefix: RULER's
    # `base` template, LongBench's pred.py for non-chat models. False: plain on every model
    # (completion prompts: LongBench's few-shot tasks, code).
    chat_template: bool = True
    meta: dict = field(default_factory=dict)
    stop: list[str] = field(default_factory=list)  # the answer ends before the first of these
    # Where the task put its one needle, in percent of the haystack (0: first, 100: last); recorded
    # in every row as ``needle_depth``, so reports can draw score over depth × context length.
    needle_depth: float | None = None


def cut_at_stop(text: str, stop: list[str]) -> str:
    """``text`` up to a stop string, as lm-evaluation-harness cuts a generation at its ``until``.

    Each stop string in turn keeps what precedes its first occurrence (an empty one is skipped).
    """
    for term in stop:
        if term:
            text = text.split(term)[0]
    return text


class Task(ABC):
    """A benchmark family; subclasses are registered with :func:`register_task`."""

    name: str = ""
    data_dir = None  # --data-dir: local copies of the data files (set by the runner before use)
    max_context: int | None = None  # --max-context: prompt tokens kept by tasks that truncate

    @abstractmethod
    def subtasks(self) -> list[str]:
        """Every subtask this family defines, available here or not."""

    def unavailable(self) -> dict[str, str]:
        """Subtasks whose data cannot be reached here, mapped to the reason (one line each)."""
        return {}

    @abstractmethod
    def samples(
        self,
        subtasks: list[str],
        n_samples: int,
        tokenizer: PreTrainedTokenizerBase,
        length: int,
        seed: int,
    ) -> Iterator[Sample]:
        """Yield ``n_samples`` samples per subtask, deterministic for a given seed and tokenizer."""


TASKS: Registry[Task] = Registry("task")


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make a task family available by its ``name`` (a second one of that name is an error)."""
    return TASKS.register(cls)
