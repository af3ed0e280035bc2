"""Tiny randomly initialised judge models for tests, demos and benchmarks.

Real judge weights cannot be assumed present. A 2-layer Qwen3 saved with `save_pretrained`
exercises the real loading, templating, generation and scoring path; its verdicts mean
nothing, everything else about it is real. The tokenizer is the real Qwen3 one when a folder
is given, else a byte-level tokenizer built in process so no file is needed at all.

`soda_guard.testing.server` (the loopback OpenAI-compatible server) is not imported here: it
needs the `testing` extra.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def shared_tokenizer_dir() -> Path | None:
    """The real Qwen3 tokenizer fixture (`../shared/fixtures/qwen3-tokenizer`), if present."""
    candidates = [os.environ.get("SODA_GUARD_TOKENIZER_DIR")]
    here = Path(__file__).resolve().parents[2]
    candidates += [str(here.parent / "shared/fixtures/qwen3-tokenizer"), str(here / "shared/fixtures/qwen3-tokenizer")]
    for candidate in candidates:
        if candidate and (Path(candidate) / "tokenizer.json").is_file():
            return Path(candidate)
    return None


def byte_tokenizer() -> Any:
    """A ChatML byte-level BPE tokenizer with no merges: 256 byte tokens plus the specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def cut_tokenizer(tokenizer_dir: str | Path, merges: int) -> Any:
    """The byte-level BPE tokenizer at `tokenizer_dir` (Qwen3's) keeping only its first `merges`
    merges, and its special tokens renumbered after them: it splits text as Qwen3 does, into
    about as many tokens (a benchmark's tool call and closing lines: 85 at 2,000 merges, where
    Qwen3 writes 63 and the byte tokenizer 219), with a vocabulary a tiny model's output layer
    holds in the proportion a real judge's does (2,282 rows at 2,000 merges). For benchmarks
    whose figures are counted in tokens."""
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    folder = Path(tokenizer_dir)
    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    model = spec["model"]
    kept = model["merges"][:merges]
    # ids must follow the merges (256 byte symbols, then one token per merge, in order) for the
    # first ids to be exactly the first merges' tokens
    if model.get("type") != "BPE" or any(model["vocab"].get("".join(pair)) != 256 + index for index, pair in enumerate(kept)):
        raise ValueError(f"{folder}: not a byte-level BPE whose token ids follow its merges")
    model["vocab"] = {token: index for token, index in model["vocab"].items() if index < 256 + len(kept)}
    model["merges"] = kept
    for offset, added in enumerate(spec["added_tokens"]):
        added["id"] = 256 + len(kept) + offset
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    tokenizer.chat_template = config.get("chat_template") or CHATML_TEMPLATE
    return tokenizer


def composing(tokenizer: Any) -> Any:
    """`tokenizer`, composing its text (NFC) before it splits it, as Qwen3's does: what its
    tokens decode to is then not, character for character, the text it was given (`e` + U+0301
    is one character, U+0958 two), which the byte tokenizer alone never shows."""
    from tokenizers import normalizers

    tokenizer.backend_tokenizer.normalizer = normalizers.NFC()
    return tokenizer


def load_test_tokenizer(tokenizer_dir: str | Path | None = None) -> Any:
    from transformers import AutoTokenizer

    if tokenizer_dir is None:
        return byte_tokenizer()
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_qwen3_config(vocab_size: int, **overrides: Any) -> Any:
    from transformers import Qwen3Config

    values: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
    )
    values.update(overrides)
    return Qwen3Config(**values)


def make_tiny_judge(
    path: str | Path, *, tokenizer_dir: str | Path | None = None, seed: int = 0, **config: Any
) -> Path:
    """Save a random 2-layer Qwen3 causal LM plus tokenizer into `path` and return it; the
    folder then loads with `from_pretrained` like a downloaded judge."""
    import torch
    from transformers import Qwen3ForCausalLM

    path = Path(path)
    tokenizer = load_test_tokenizer(tokenizer_dir)
    torch.manual_seed(seed)
    vocab = len(tokenizer)
    model = Qwen3ForCausalLM(
        tiny_qwen3_config(
            vocab,
            eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
            pad_token_id=tokenizer.pad_token_id,
            **config,
        )
    )
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
