"""Prompts -> CLIP token ids (transformers' CLIPTokenizer, local files only) -> text encoder contexts.

Shared by the data pipeline (captions), the dataset tools and sampling (prompts); the official demo's prompt
texts are sampling's (cnc_jax.sampling.demo_prompts)."""

from __future__ import annotations

import os
from typing import Sequence

import jax
import numpy as np

from cnc_jax.model_config import TextEncoderConfig
from cnc_jax.models.clip_text import CLIPTextTransformer

def load_tokenizer(path: str):
    """A CLIPTokenizer from a local folder (tokenizer.json, or vocab.json + merges.txt); never downloads."""
    from transformers import CLIPTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer folder {path} does not exist (it should hold the files of "
                                "openai/clip-vit-large-patch14's tokenizer: vocab.json + merges.txt or tokenizer.json)")
    return CLIPTokenizer.from_pretrained(path, local_files_only=True)


def byte_level_tokenizer():
    """A merge-free CLIP BPE tokenizer over the 256 byte-level symbols (514 ids: 512 symbols, bos, eos).

    Used with randomly initialised tiny models (smoke tests) so that nothing has to be downloaded.
    """
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    return CLIPTokenizer(vocab=vocab, merges=[])


def tokenizer_by_name(name: str):
    """'byte_level' (the tiny preset's tokenizer) or a folder of CLIP tokenizer files."""
    return byte_level_tokenizer() if name == "byte_level" else load_tokenizer(name)


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
