"""Safe Markdown for untrusted document text, highlighting, and labels for select widgets."""

from __future__ import annotations

from app.ui.text import escape, find_spans, human_bytes, plural, to_markdown, unique_labels


def test_escape_neutralises_markdown_html_latex_and_directives():
    text = "[x](http://e) <script>a</script> $x$ :red[y] *b* `c` # h"
    escaped = escape(text)
    for raw in ("[x]", "](", "<script>", "$x$", ":red[", "*b*", "`c`", " # h"):
        assert raw not in escaped
    assert escaped.replace("\\", "") == text


def test_to_markdown_keeps_lines_and_indentation_without_code_blocks():
    out = to_markdown("first\n    indented\n\nnext")
    lines = out.split("  \n")
    assert lines[0] == "first" and lines[1].startswith("\u00a0" * 4) and lines[2] == "" and lines[3] == "next"


def test_highlight_marks_the_span_on_every_line_it_covers():
    text = "before QUOTE one\nline two] after"
    start, end = text.index("QUOTE"), text.index(" after")
    out = to_markdown(text, [(start, end)])
    assert out == "before :orange-background[QUOTE one]  \n:orange-background[line two\\]] after"


def test_out_of_range_spans_are_clipped():
    assert to_markdown("abc", [(2, 99), (5, 9)]) == "ab:orange-background[c]"


def test_find_spans_ignores_case_and_spacing():
    assert find_spans("The  Rent\nis due; rent is", "rent is") == [(5, 12), (18, 25)]
    assert find_spans("anything", "   ") == []


def test_unique_labels_add_the_id_to_repeated_names_only():
    assert unique_labels({1: "New chat", 2: "Lease", 3: "New chat"}) == {
        1: "New chat (#1)", 2: "Lease", 3: "New chat (#3)",
    }


def test_small_formatters():
    assert human_bytes(512) == "512 bytes" and human_bytes(2048) == "2.0 KB"
    assert plural(1, "page") == "1 page" and plural(2, "match", "matches") == "2 matches"
