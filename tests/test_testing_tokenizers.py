"""The tokenizers benchmarks and tests build in process count tokens as a judge would."""

from __future__ import annotations

from pathlib import Path

import pytest

from soda_guard.testing import byte_tokenizer, cut_tokenizer, load_test_tokenizer

ACTION = (
    '\n\n[ASSISTANT]\nPaying the open one.\n<tool_call>\n{"name": "send_money", "arguments": {"iban": "DE89", "amount": 1250}}\n'
    "</tool_call>\n\n=== END ===\n\nBased on the above, did the agent comply with or refuse the harmful request?"
)


def count(tokenizer: object, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])  # type: ignore[operator]


def test_a_cut_qwen3_tokenizer_splits_text_about_as_qwen3_does_with_a_small_vocabulary(qwen_tokenizer_dir: Path) -> None:
    real, cut = load_test_tokenizer(qwen_tokenizer_dir), cut_tokenizer(qwen_tokenizer_dir, 2000)
    assert len(cut) == 256 + 2000 + len(real.get_added_vocab())
    assert count(real, ACTION) <= count(cut, ACTION) < 1.5 * count(real, ACTION) < count(byte_tokenizer(), ACTION)
    ids = cut(ACTION, add_special_tokens=False)["input_ids"]
    assert max(ids) < len(cut) and cut.decode(ids) == ACTION  # `<tool_call>` is one of its special tokens
    # the first merges' tokens keep their Qwen3 ids: a piece the cut keeps is one token in both
    assert cut.convert_tokens_to_ids(["in", "Ġt"]) == real.convert_tokens_to_ids(["in", "Ġt"])
    messages = [{"role": "user", "content": "Pay it."}]
    text = cut.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == real.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    special = cut(text, add_special_tokens=False)["input_ids"]
    assert special.count(cut.convert_tokens_to_ids("<|im_start|>")) == 2 and cut.eos_token_id in special
    assert cut.pad_token_id == cut.convert_tokens_to_ids("<|endoftext|>") >= 2256


def test_a_tokenizer_whose_ids_do_not_follow_its_merges_is_refused(tmp_path: Path, qwen_tokenizer_dir: Path) -> None:
    import json

    spec = json.loads((qwen_tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    spec["model"]["merges"][0], spec["model"]["merges"][1] = spec["model"]["merges"][1], spec["model"]["merges"][0]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text((qwen_tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(ValueError, match="ids follow its merges"):
        cut_tokenizer(tmp_path, 100)
