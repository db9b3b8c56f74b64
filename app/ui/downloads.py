"""Download buttons for exports; files are only built when a button is clicked."""

from __future__ import annotations

from collections.abc import Callable

import streamlit as st

from app.services.exports import MIME_TYPES, Format, Report, file_name, render

LABELS: dict[Format, str] = {"md": "Markdown", "docx": "Word", "pdf": "PDF"}


def _builder(make_report: Callable[[], Report], fmt: Format) -> Callable[[], bytes]:
    return lambda: render(make_report(), fmt)


def export_buttons(make_report: Callable[[], Report], title: str, key: str) -> None:
    columns = st.columns(len(LABELS))
    for column, (fmt, label) in zip(columns, LABELS.items(), strict=True):
        column.download_button(
            label, data=_builder(make_report, fmt), file_name=file_name(title, fmt), mime=MIME_TYPES[fmt],
            key=f"export:{key}:{fmt}", on_click="ignore", icon=":material/download:", width="stretch",
        )
