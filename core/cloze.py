"""Fill-in-the-blank check of what a masked-language model knows (the probe Dai et al. 2022 use for
knowledge neurons): the model's top words for the blank in a prompt, and the same with chosen FFN
neurons zeroed. Only models saved with their MLM head (e.g. the mini-paper preset's model A) have one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import AutoConfig

from .adapters import MaskedLanguageModel, load_masked_lm
from .errors import LensError
from .pair import Encoder, Tower
from .runtime import model_work
from .suppression import Neuron, suppressing

BLANKS = ("[MASK]", "___")
MLM_ARCHITECTURES = ("ForMaskedLM", "ForPreTraining")
MAX_PROMPT_TOKENS = 128


class ClozeError(LensError):
    """A prompt or model the check cannot use; the message is meant for the user."""


@dataclass(frozen=True)
class Prediction:
    word: str
    probability: float


@dataclass
class ClozeModel:
    head: MaskedLanguageModel  # the model with its MLM head
    tower: Tower  # the MLM model's own encoder with the encoder's tokenizer, for tokens and neuron suppression

    @property
    def blank(self) -> str:
        return self.tower.mask_token


def has_mlm_head(encoder: Encoder) -> bool:
    try:
        architectures = AutoConfig.from_pretrained(encoder.source).architectures or []
    except (OSError, ValueError):
        return False
    return any(name.endswith(MLM_ARCHITECTURES) for name in architectures)


def load_cloze_model(encoder: Encoder) -> ClozeModel:
    if not has_mlm_head(encoder):
        raise ClozeError(f"'{encoder.label}' was not saved with a masked-LM head, so it cannot fill in a blank.")
    head = load_masked_lm(encoder.source)
    return ClozeModel(head, encoder.query.with_model(head.backbone, "cls", False))


def _encode_prompt(cloze: ClozeModel, prompt: str) -> tuple[dict[str, torch.Tensor], int]:
    text = prompt.strip()
    for blank in BLANKS:
        text = text.replace(blank, cloze.blank)
    if text.count(cloze.blank) != 1:
        raise ClozeError(f"Write the prompt with exactly one blank, as {BLANKS[0]} or {BLANKS[1]}.")
    batch = cloze.tower.tokenize([text], max_length=MAX_PROMPT_TOKENS)  # one row: no padding
    positions = (batch["input_ids"][0] == cloze.tower.mask_token_id).nonzero()
    if len(positions) != 1:
        raise ClozeError(f"The prompt is longer than {MAX_PROMPT_TOKENS} tokens before its blank; shorten it.")
    return dict(batch), int(positions[0])


@model_work
@torch.no_grad()
def fill_in_blank(cloze: ClozeModel, prompt: str, top_k: int = 5, zeroed: Sequence[Neuron] = ()) -> list[Prediction]:
    """The top_k words for the blank, with the `zeroed` FFN neurons set to 0 at every position."""
    batch, position = _encode_prompt(cloze, prompt)
    with suppressing(cloze.tower, [list(zeroed)]):
        logits = cloze.head.logits(batch)[0, position]
    probabilities = logits.softmax(-1)
    values, ids = probabilities.topk(top_k)
    words = cloze.tower.convert_ids_to_tokens(ids.tolist())
    return [Prediction(word, float(value)) for word, value in zip(words, values)]
