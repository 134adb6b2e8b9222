"""Decoding for every stage (evaluation, GRPO sampling, serving, distillation): one component on top of
transformers' ``model.generate``.

``generate`` completes a batch of prompts (conversations or rendered strings) into :class:`Completion`
values; ``stream`` yields the text of one completion as it is generated; ``end_of_turn_ids`` gives the
tokens that end an assistant turn under a tokenizer's chat template, where generation stops by default.
"""

from tunelab.generation.generate import generate, render_prompt
from tunelab.generation.settings import Completion, FinishReason, SamplingSettings
from tunelab.generation.stops import end_of_turn_ids
from tunelab.generation.stream import stream

__all__ = ["Completion", "FinishReason", "SamplingSettings", "end_of_turn_ids", "generate", "render_prompt", "stream"]
