"""One adapter per model family: everything the analyses need from a transformer's internals.

A `Tower` (core.pair) holds the adapter of its model and the analyses ask the Tower; nothing outside
this module and core.pair walks a model's modules. An adapter is stateless: every method takes the
model, so a Tower whose model is swapped (a test edits a deep copy) keeps working.

Families:
- BERT: bert-base, MiniLM, the mini-BERT of the mini-paper preset, and the BERT inside DPR's question and
  context encoders (`question_encoder.bert_model` / `ctx_encoder.bert_model`).
- DistilBERT: the GPL pair.
- RoBERTa / XLM-R: position ids count from `padding_idx + 1` and pad tokens get position `padding_idx`;
  token type ids are not used (type_vocab_size 1); specials are <s>, </s>, <pad>.

The interface (`ModelAdapter`): backbone, word_embeddings, layers (the layer stack), ffn_sites (the FFN
down projections, see `FfnSite`), layer_outputs (where the residual stream leaves each layer), forward_kwargs
(which batch entries the model takes, plus what it needs besides), hidden_states (every layer's output, the
embeddings first), max_positions, and load_masked_lm / MaskedLanguageModel for the fill-in-the-blank check.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import ClassVar

import torch
from torch import nn
from transformers import PreTrainedModel

from .device import model_device
from .errors import LensError

DPR_ENCODERS = ("question_encoder", "ctx_encoder")  # DPRQuestionEncoder / DPRContextEncoder -> .bert_model


class UnsupportedModelError(LensError):
    """A model of a family no adapter knows; core.pair turns it into a ModelLoadError naming the source."""

    def __init__(self, model: nn.Module):
        self.model_class = type(model).__name__
        self.model_type = getattr(getattr(model, "config", None), "model_type", None) or "unknown"
        super().__init__(
            f"{self.model_class} (model type '{self.model_type}') is not a supported text encoder; "
            f"supported families: {supported_families()}."
        )


class NeuronSiteError(LensError):
    """A model whose FFN layers the neuron analyses cannot hook; the message is meant for the user."""

    def __str__(self) -> str:
        return f"{super().__str__()} Knowledge neurons need BERT-, DistilBERT- or RoBERTa-style encoders."


@dataclass(frozen=True)
class FfnSite:
    """One layer's FFN: `down` is its second Linear (input = intermediate site, output = output site).

    `join` is where extra rows can enter the batch with the layer's FFN input and residual already
    computed: BERT's / RoBERTa's `output` module (hooked before, both arguments widened) or DistilBERT's
    `sa_layer_norm` (hooked after, its output is both the FFN input and the residual).
    """

    down: nn.Linear
    join: nn.Module
    join_before: bool


def layer_hidden(output: torch.Tensor | tuple) -> torch.Tensor:
    """The hidden state in a `layer_outputs` module's output (a tensor, or a tuple led by it in older transformers)."""
    return output[0] if isinstance(output, tuple) else output


def with_layer_hidden(output: torch.Tensor | tuple, hidden: torch.Tensor) -> torch.Tensor | tuple:
    """The module's output with its hidden state replaced."""
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@cache
def _forward_parameters(model_class: type) -> frozenset[str]:
    return frozenset(inspect.signature(model_class.forward).parameters)


class ModelAdapter(ABC):
    """What the analyses need from one model family; every method takes the model it is asked about."""

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]

    # ---- structure ---------------------------------------------------------------------------

    def backbone(self, model: PreTrainedModel) -> PreTrainedModel:
        """The transformer itself: inside DPR wrappers their BERT, the model otherwise."""
        return model

    def word_embeddings(self, model: PreTrainedModel) -> nn.Embedding:
        return self.backbone(model).get_input_embeddings()

    @abstractmethod
    def layers(self, model: PreTrainedModel) -> nn.ModuleList:
        """The transformer layers, bottom first."""

    @abstractmethod
    def ffn_site(self, layer: nn.Module, index: int) -> FfnSite:
        """The FFN of one layer (raises NeuronSiteError if it cannot be hooked)."""

    def ffn_sites(self, model: PreTrainedModel) -> list[FfnSite]:
        return [self.ffn_site(layer, index) for index, layer in enumerate(self.layers(model))]

    def layer_outputs(self, model: PreTrainedModel) -> list[nn.Module]:
        """Per layer, the module whose output is the residual stream after that layer (see `layer_hidden`)."""
        return list(self.layers(model))

    def hidden_size(self, model: PreTrainedModel) -> int:
        return self.backbone(model).config.hidden_size

    def max_positions(self, model: PreTrainedModel) -> int:
        """The longest input the position embeddings cover."""
        return self.backbone(model).config.max_position_embeddings

    # ---- inputs ------------------------------------------------------------------------------

    def forward_kwargs(self, model: PreTrainedModel, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What model(input_ids=... or inputs_embeds=..., **these) needs from a tokenized batch.

        Token type ids only where the model takes them and has more than one type (a one-type model
        fails on the second segment's 1s and reads the same zeros without them).
        """
        kwargs = {"attention_mask": batch["attention_mask"]}
        if (
            "token_type_ids" in batch
            and "token_type_ids" in _forward_parameters(type(model))
            and getattr(model.config, "type_vocab_size", 2) > 1
        ):
            kwargs["token_type_ids"] = batch["token_type_ids"]
        return kwargs

    def hidden_states(self, model: PreTrainedModel, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """(layers + 1) hidden states of the batch; the first is the embedding output."""
        outputs = model(input_ids=batch["input_ids"], **self.forward_kwargs(model, batch), output_hidden_states=True)
        return tuple(outputs.hidden_states)

    # ---- masked-LM head ------------------------------------------------------------------------

    def masked_lm_backbone(self, mlm_model: PreTrainedModel) -> PreTrainedModel:
        """The encoder inside a ...ForMaskedLM / ...ForPreTraining model."""
        return getattr(mlm_model, mlm_model.base_model_prefix)


def _no_chunking(chunk_size: int | None) -> None:
    if chunk_size:
        raise NeuronSiteError("Models with chunked feed-forward layers are not supported.")


class BertStyleAdapter(ModelAdapter):
    """`encoder.layer[i]` with `intermediate` (up + activation) and `output` (down + residual + LayerNorm)."""

    def layers(self, model: PreTrainedModel) -> nn.ModuleList:
        return self.backbone(model).encoder.layer

    def ffn_site(self, layer: nn.Module, index: int) -> FfnSite:
        _no_chunking(getattr(layer, "chunk_size_feed_forward", 0))
        output = getattr(layer, "output", None)
        if not (isinstance(getattr(output, "dense", None), nn.Linear) and hasattr(layer, "intermediate")):
            raise NeuronSiteError(f"Layer {index} ({type(layer).__name__}) has no {self.family}-style FFN.")
        return FfnSite(output.dense, output, True)


class BertAdapter(BertStyleAdapter):
    family = "BERT"
    model_types = ("bert", "dpr")

    def backbone(self, model: PreTrainedModel) -> PreTrainedModel:
        for name in DPR_ENCODERS:
            inner = getattr(getattr(model, name, None), "bert_model", None)
            if inner is not None:
                return inner
        return model


class RobertaAdapter(BertStyleAdapter):
    """RoBERTa and XLM-R: BERT's layers, fairseq position ids and no token types."""

    family = "RoBERTa/XLM-R"
    model_types = ("roberta", "xlm-roberta")

    def max_positions(self, model: PreTrainedModel) -> int:
        config = self.backbone(model).config
        return config.max_position_embeddings - config.pad_token_id - 1  # positions start at padding_idx + 1

    def forward_kwargs(self, model: PreTrainedModel, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Position ids from the attention mask, not from the token ids: the model itself numbers the tokens
        that are not <pad>, so a [PAD] baseline or a deleted token would shift every later position (and
        inputs_embeds would number padding too). For ordinary input this is the model's own numbering."""
        kwargs = super().forward_kwargs(model, batch)
        mask = batch["attention_mask"].long()
        kwargs["position_ids"] = torch.cumsum(mask, dim=1) * mask + model.config.pad_token_id
        return kwargs


class DistilBertAdapter(ModelAdapter):
    """`transformer.layer[i]`: attention, `sa_layer_norm`, `ffn` (lin1, activation, lin2), `output_layer_norm`."""

    family = "DistilBERT"
    model_types = ("distilbert",)

    def layers(self, model: PreTrainedModel) -> nn.ModuleList:
        return self.backbone(model).transformer.layer

    def ffn_site(self, layer: nn.Module, index: int) -> FfnSite:
        ffn = getattr(layer, "ffn", None)
        _no_chunking(getattr(ffn, "chunk_size_feed_forward", 0))
        if not (isinstance(getattr(ffn, "lin2", None), nn.Linear) and hasattr(layer, "sa_layer_norm")):
            raise NeuronSiteError(f"Layer {index} ({type(layer).__name__}) has no DistilBERT-style FFN.")
        return FfnSite(ffn.lin2, layer.sa_layer_norm, False)


ADAPTERS: tuple[ModelAdapter, ...] = (BertAdapter(), DistilBertAdapter(), RobertaAdapter())


def supported_families() -> str:
    return ", ".join(f"{adapter.family} ({', '.join(adapter.model_types)})" for adapter in ADAPTERS)


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter of the model's family, from its config.model_type; UnsupportedModelError otherwise."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise UnsupportedModelError(model)


class MaskedLanguageModel:
    """A model with its masked-LM head (e.g. BertForMaskedLM): the encoder inside and the logits."""

    def __init__(self, model: PreTrainedModel):
        self.model = model
        self.adapter = adapter_for(model)

    @property
    def backbone(self) -> PreTrainedModel:
        return self.adapter.masked_lm_backbone(self.model)

    def logits(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(rows, tokens, vocabulary) logits; the caller picks grad mode."""
        return self.model(input_ids=batch["input_ids"], **self.adapter.forward_kwargs(self.model, batch)).logits


def load_masked_lm(source: str) -> MaskedLanguageModel:
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(source, dtype=torch.float32).eval()
    return MaskedLanguageModel(model.to(model_device()))
