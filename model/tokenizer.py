"""Qwen3 tokenizer for the runtime: text <-> token ids, ChatML prompt segments, streaming decode.

Wraps a ``tokenizers.Tokenizer`` loaded from a model folder's ``tokenizer.json`` (or the
``vocab.json`` / ``merges.txt`` pair) and ``tokenizer_config.json``; the vocabulary is whatever the
checkpoint ships (Qwen3's 151K tokens, Qwen3.5 / Qwen3.6's 248K).  Two rules shape the API:

* User and document text never turns into control tokens.  ``encode`` treats a literal
  ``<|im_end|>`` or ``<think>`` inside text as plain characters unless ``allow_special=True``;
  otherwise a document could close the current turn and inject instructions.
* Prompts are built from id segments (``turn``, ``generation_prompt``) that are concatenated, so a
  shared conversation prefix always yields the same ids whatever follows, which keeps prefix caches
  valid.  Each segment is split at the control tokens exactly where the ChatML template would be,
  so the result equals tokenizing the rendered template.
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import tokenizers

from .tokenizer_files import QWEN3, QWEN3_5, bytes_to_unicode, tokenizer_json_from_vocab_merges

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
END_OF_TEXT = "<|endoftext|>"
THINK_START = "<think>"
THINK_END = "</think>"

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"


class TokenizerError(ValueError):
    """A tokenizer folder is missing, unreadable or lacks what ChatML prompting needs."""


_BYTE_DECODER = {char: byte for byte, char in bytes_to_unicode().items()}


def _missing(path: Path) -> str:
    return (f"{path} is missing; a tokenizer folder needs {TOKENIZER_FILE} (or {VOCAB_FILE} and {MERGES_FILE}) "
            f"and {CONFIG_FILE}")


def _load_backend(path: Path) -> tokenizers.Tokenizer:
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as exc:
        raise TokenizerError(f"{path} is not a valid tokenizers file: {exc}") from exc


def _backend_from_vocab_merges(folder: Path, config: dict[str, Any]) -> tokenizers.Tokenizer:
    """The pipeline transformers builds from ``vocab.json`` and ``merges.txt``; Qwen3.5's pre-tokenizer
    for its tokenizer class or vocabulary size, Qwen2/Qwen3's otherwise."""
    try:
        vocab = json.loads((folder / VOCAB_FILE).read_text(encoding="utf-8"))
        lines = (folder / MERGES_FILE).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"{folder / VOCAB_FILE} or {folder / MERGES_FILE} is unreadable: {exc}") from exc
    if not isinstance(vocab, dict):
        raise TokenizerError(f"{folder / VOCAB_FILE} must hold a JSON object of token -> id")
    merges = [line.split(" ") for line in lines if line and not line.startswith("#version")]
    added = []
    for token_id, entry in (config.get("added_tokens_decoder") or {}).items():
        if isinstance(entry, dict) and isinstance(entry.get("content"), str):
            added.append({"single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
                          "special": False, **entry, "id": int(token_id)})
    qwen3_5 = config.get("tokenizer_class") == QWEN3_5.tokenizer_class or len(vocab) >= QWEN3_5.first_added_id
    serialised = tokenizer_json_from_vocab_merges(vocab, merges, added, QWEN3_5 if qwen3_5 else QWEN3)
    try:
        return tokenizers.Tokenizer.from_str(serialised)
    except Exception as exc:
        raise TokenizerError(f"{folder / VOCAB_FILE} and {folder / MERGES_FILE} do not make a tokenizer: "
                             f"{exc}") from exc


def _load_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise TokenizerError(f"{path} must hold a JSON object, found {type(config).__name__}")
    return config


def _token_content(value: Any) -> str | None:
    """Config token fields are either a plain string or an AddedToken dict with ``content``."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _chat_template(config: dict[str, Any], folder: Path) -> str | None:
    """The default template from the config, or from ``chat_template.jinja`` as newer exports store it."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        template = named.get("default")
    if isinstance(template, str):
        return template
    jinja = folder / TEMPLATE_FILE
    return jinja.read_text(encoding="utf-8") if jinja.is_file() else None


def _plain_backend(backend: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    """Same pipeline without added tokens, so control-token strings in text are encoded as text.

    ``tokenizers`` always extracts added tokens from the input (``encode_special_tokens`` only
    covers the ones flagged special, not ``<think>`` or ``<tool_call>``), hence a second
    tokenizer sharing the BPE model.
    """
    plain = tokenizers.Tokenizer(backend.model)
    plain.normalizer = backend.normalizer
    plain.pre_tokenizer = backend.pre_tokenizer
    plain.post_processor = backend.post_processor
    plain.decoder = backend.decoder
    return plain


class Tokenizer:
    """Byte-level BPE tokenizer with Qwen's ChatML control tokens."""

    def __init__(
        self, backend: tokenizers.Tokenizer, config: dict[str, Any], chat_template: str | None
    ) -> None:
        self._backend = backend
        self._plain = _plain_backend(backend)
        self._chat_template = chat_template
        added = backend.get_added_tokens_decoder()
        self._added_ids = frozenset(added)
        self._special_ids = frozenset(i for i, token in added.items() if token.special)
        self._im_start_id = self._required_id(IM_START)
        self._im_end_id = self._required_id(IM_END)
        self._think_start_id = backend.token_to_id(THINK_START)
        self._think_end_id = backend.token_to_id(THINK_END)
        self._eos_ids = self._collect_eos_ids(config)
        self._bytes_cache: dict[int, bytes] = {}

    @classmethod
    def from_folder(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load ``tokenizer.json`` (or ``vocab.json`` and ``merges.txt``) and ``tokenizer_config.json``
        from a model folder."""
        folder = Path(path)
        if not folder.is_dir():
            raise TokenizerError(f"tokenizer folder {folder} does not exist or is not a directory")
        pair = (folder / VOCAB_FILE).is_file() and (folder / MERGES_FILE).is_file()
        if not (folder / TOKENIZER_FILE).is_file() and not pair:
            raise TokenizerError(_missing(folder / TOKENIZER_FILE))
        if not (folder / CONFIG_FILE).is_file():
            raise TokenizerError(_missing(folder / CONFIG_FILE))
        config = _load_config(folder / CONFIG_FILE)
        if (folder / TOKENIZER_FILE).is_file():
            backend = _load_backend(folder / TOKENIZER_FILE)
        else:
            backend = _backend_from_vocab_merges(folder, config)
        return cls(backend, config, _chat_template(config, folder))

    def _required_id(self, token: str) -> int:
        token_id = self._backend.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"tokenizer has no {token} token, which ChatML prompts require")
        return token_id

    def _collect_eos_ids(self, config: dict[str, Any]) -> frozenset[int]:
        """Any of these ends generation: the turn end, the document end, and the configured EOS."""
        ids = {self._im_end_id}
        for token in (END_OF_TEXT, _token_content(config.get("eos_token"))):
            token_id = self._backend.token_to_id(token) if token else None
            if token_id is not None:
                ids.add(token_id)
        return frozenset(ids)

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of ``text``; control-token strings stay plain text unless ``allow_special``."""
        backend = self._backend if allow_special else self._plain
        return backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of ``ids``; ``skip_special`` drops tokens flagged special (not the think/tool tags)."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special)

    def token_id(self, token: str) -> int | None:
        """Id of a vocabulary entry or added token given its exact string, None when absent."""
        return self._backend.token_to_id(token)

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes a token stands for; b"" for ids outside the vocabulary, as ``decode`` skips them."""
        cached = self._bytes_cache.get(token_id)
        if cached is not None:
            return cached
        piece = self._backend.id_to_token(token_id)
        if piece is None:
            data = b""
        elif token_id in self._added_ids:
            data = piece.encode("utf-8")
        else:
            data = b"".join(
                bytes([_BYTE_DECODER[ch]]) if ch in _BYTE_DECODER else ch.encode("utf-8") for ch in piece
            )
        self._bytes_cache[token_id] = data
        return data

    def is_special(self, token_id: int) -> bool:
        """Whether ``decode(..., skip_special=True)`` drops this id."""
        return token_id in self._special_ids

    @property
    def vocab_size(self) -> int:
        """Number of token ids including added tokens (the model's embedding may be padded larger)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_ids(self) -> frozenset[int]:
        return self._eos_ids

    @property
    def im_start_id(self) -> int:
        return self._im_start_id

    @property
    def im_end_id(self) -> int:
        return self._im_end_id

    @property
    def think_start_id(self) -> int | None:
        return self._think_start_id

    @property
    def think_end_id(self) -> int | None:
        return self._think_end_id

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    def turn(self, role: str, content: str) -> list[int]:
        """One ChatML message, ``<|im_start|>{role}\\n{content}<|im_end|>\\n``, as ids.

        ``content`` is encoded without control tokens, so a message cannot end its own turn.
        """
        return [self._im_start_id, *self.encode(f"{role}\n{content}"), self._im_end_id, *self.encode("\n")]

    def generation_prompt(self, enable_thinking: bool | None = None) -> list[int]:
        """Ids that open the assistant's reply.

        ``None`` adds nothing after ``<|im_start|>assistant\\n`` (Instruct models).  For Thinking
        models, ``False`` appends an empty ``<think>\\n\\n</think>\\n\\n`` block so the answer starts
        directly, and ``True`` opens ``<think>\\n`` as their own template does.
        """
        ids = [self._im_start_id, *self.encode("assistant\n")]
        if enable_thinking is None:
            return ids
        if self._think_start_id is None or self._think_end_id is None:
            raise TokenizerError("enable_thinking needs <think> and </think>, which this tokenizer lacks")
        if enable_thinking:
            return [*ids, self._think_start_id, *self.encode("\n")]
        return [*ids, self._think_start_id, *self.encode("\n\n"), self._think_end_id, *self.encode("\n\n")]

    def stream_decoder(self, skip_special: bool = False) -> IncrementalDecoder:
        return IncrementalDecoder(self, skip_special=skip_special)


class IncrementalDecoder:
    """Turns generated ids into text deltas as they arrive.

    A token may end inside a multi-byte UTF-8 character (CJK, emoji); those bytes are held back
    until the character is complete, so a delta never contains a broken character.  The
    concatenated deltas plus ``flush()`` equal ``Tokenizer.decode`` of all ids.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one id and return the text that became complete (possibly empty)."""
        if self._skip_special and self._tokenizer.is_special(token_id):
            return ""
        return self._utf8.decode(self._tokenizer.token_bytes(token_id))

    def push_many(self, ids: Iterable[int]) -> str:
        return "".join(self.push(token_id) for token_id in ids)

    def flush(self) -> str:
        """End of stream: held-back bytes of an unfinished character become U+FFFD."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text
