"""Prompts -> CLIP token ids (transformers' CLIPTokenizer, local files only) -> text encoder contexts.

Shared by the data pipeline (captions), the dataset tools and sampling (prompts); the official demo's prompt
texts are sampling's (cnc_jax.sampling.demo_prompts)."""

from __future__ import annotations

import json
import os
import shutil
from typing import Sequence

import jax
import numpy as np

from cnc_jax.model_config import TextEncoderConfig
from cnc_jax.models.clip_text import CLIPTextTransformer

BYTE_LEVEL = "byte_level"  # the tiny preset's tokenizer, named where a folder could stand
CLIP_CONTEXT = 77  # SD's CLIP text encoder's max_position_embeddings
TOKENIZER_FILES = ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "tokenizer.json")


def clip_tokenizer_class():
    """transformers' CLIPTokenizer, imported without its advice that PyTorch is missing: cnc_jax takes only the
    tokenizer from transformers and needs no torch. (Imported when first needed: transformers takes seconds.)"""
    advice = os.environ.get("TRANSFORMERS_NO_ADVISORY_WARNINGS")
    os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"  # read once, while transformers is first imported
    try:
        from transformers import CLIPTokenizer
    finally:
        if advice is None:
            del os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"]
        else:
            os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = advice
    return CLIPTokenizer


def load_tokenizer(path: str):
    """A CLIPTokenizer from a local folder (tokenizer.json, or vocab.json + merges.txt); never downloads."""
    CLIPTokenizer = clip_tokenizer_class()
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer folder {path} does not exist (it should hold the files of "
                                "openai/clip-vit-large-patch14's tokenizer: vocab.json + merges.txt or tokenizer.json)")
    return CLIPTokenizer.from_pretrained(path, local_files_only=True)


def byte_level_tokenizer(model_max_length: int = CLIP_CONTEXT):
    """A merge-free CLIP BPE tokenizer over the 256 byte-level symbols (514 ids: 512 symbols, bos, eos).

    Used with randomly initialised tiny models (smoke tests) so that nothing has to be downloaded.
    model_max_length is the text encoder's context: pipelines that pad prompts to it (diffusers) get that many
    tokens, not transformers' 1e30 "no limit" (which overflows there).
    """
    from tokenizers import pre_tokenizers

    CLIPTokenizer = clip_tokenizer_class()
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def tokenizer_by_name(name: str):
    """'byte_level' (the tiny preset's tokenizer) or a folder of CLIP tokenizer files."""
    return byte_level_tokenizer() if name == BYTE_LEVEL else load_tokenizer(name)


def check_tokenizer(name: str, vocab_size: int):
    """The tokenizer `name` names (a folder with tokenizer.json, or vocab.json + merges.txt; or 'byte_level'), read
    as CLIPTokenizer and checked against a text encoder of vocab_size ids: ValueError before anything is written."""
    if name != BYTE_LEVEL:
        if not os.path.isdir(name):
            raise ValueError(f"tokenizer folder {name} does not exist")
        have = {f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(name, f))}
        if "tokenizer.json" not in have and not {"vocab.json", "merges.txt"} <= have:
            raise ValueError(f"{name}: not a CLIP tokenizer folder (needs tokenizer.json, or vocab.json and "
                             "merges.txt)")
    try:
        tokenizer = tokenizer_by_name(name)
    except Exception as e:  # transformers / tokenizers raise many kinds for a broken file; all mean "unreadable"
        raise ValueError(f"{name}: transformers' CLIPTokenizer cannot read it ({type(e).__name__}: {e})") from None
    if len(tokenizer) > vocab_size:
        raise ValueError(f"{name}: {len(tokenizer)} tokens, but the text encoder has only {vocab_size} ids")
    return tokenizer


def save_tokenizer(name: str, out_dir: str, max_length: int) -> None:
    """Write tokenizer `name` into out_dir so that it travels: the source's files (or the byte-level tokenizer's,
    which exist nowhere else), completed to both layouts transformers reads (tokenizer.json for the fast
    CLIPTokenizer; vocab.json + merges.txt, derived from it where missing, for the python one of transformers 4),
    with model_max_length at most the text encoder's context (diffusers pads prompts to it)."""
    os.makedirs(out_dir, exist_ok=True)
    if name == BYTE_LEVEL:
        byte_level_tokenizer(max_length).save_pretrained(out_dir)
    else:
        for file in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(name, file)):
                shutil.copyfile(os.path.join(name, file), os.path.join(out_dir, file))
    config_path = os.path.join(out_dir, "tokenizer_config.json")
    config = _read_json(config_path) if os.path.isfile(config_path) else {"tokenizer_class": "CLIPTokenizer"}
    limit = config.get("model_max_length")
    if not isinstance(limit, int) or limit > max_length:
        config["model_max_length"] = max_length
    _write_json(config_path, config)
    fast = os.path.join(out_dir, "tokenizer.json")
    if os.path.isfile(fast) and not all(os.path.isfile(os.path.join(out_dir, f)) for f in ("vocab.json", "merges.txt")):
        model = _read_json(fast).get("model", {})
        if model.get("type") == "BPE":
            _write_json(os.path.join(out_dir, "vocab.json"), model["vocab"])
            merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
            with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
                f.write("#version: 0.2\n" + "".join(m + "\n" for m in merges))


def _read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _write_json(path: str, data) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def tokenize(tokenizer, prompts: Sequence[str], length: int) -> np.ndarray:
    """(B, length) int32 ids, padded with the end token and truncated like FrozenCLIPEmbedder."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True)["input_ids"]
    return np.asarray(ids, np.int32)


class TextEncoder:
    """Prompts -> (B, L, C) contexts; one compiled encoder per batch size."""

    def __init__(self, config: TextEncoderConfig, params: dict, tokenizer):
        if len(tokenizer) > config.vocab_size:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the text encoder only {config.vocab_size}")
        self.config, self.params, self.tokenizer = config, params, tokenizer
        model = CLIPTextTransformer(config)
        self._encode = jax.jit(lambda p, ids: model.apply({"params": p}, ids))

    def __call__(self, prompts: Sequence[str]) -> np.ndarray:
        ids = tokenize(self.tokenizer, prompts, self.config.max_position_embeddings)
        return np.asarray(self._encode(self.params, ids))
