"""Loader for lambada_local.yaml: the local LAMBADA jsonl as a `datasets.DatasetDict` (split "test")."""

from __future__ import annotations


def load_lambada(data_file: str | None = None, data_dir: str | None = None, **_ignored):
    import datasets

    from gpt2serve.eval.data import find, read_lambada

    path = data_file or find("lambada", data_dir)
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([{"text": t} for t in read_lambada(path)])})
