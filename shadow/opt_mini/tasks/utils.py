"""Loaders for opt-mini's lm-eval tasks: paths resolve against this file, so any working directory works."""

from pathlib import Path

import datasets
from lm_eval.tasks.wikitext.preprocess_wikitext import process_results  # noqa: F401 - same word/byte counts

DATA = Path(__file__).resolve().parent.parent / "data"


def _splits(**files: str) -> datasets.DatasetDict:
    return datasets.load_dataset("json", data_files={split: str(DATA / name) for split, name in files.items()})


def nextsent(**_metadata) -> datasets.DatasetDict:
    return _splits(train="nextsent_train.jsonl", validation="nextsent_validation.jsonl")


def lastword(**_metadata) -> datasets.DatasetDict:
    return _splits(train="lastword_train.jsonl", validation="lastword_validation.jsonl")


def perplexity(**_metadata) -> datasets.DatasetDict:
    return _splits(test="perplexity.jsonl")
