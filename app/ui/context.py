"""The services every page uses, built once per process and shared by all browser tabs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

import streamlit as st

from app.services.container import Services, get_services
from app.settings import Settings, SettingsError, load_settings
from app.ui.text import escape


@st.cache_resource(show_spinner="Loading the model; the first start can take a while…")
def _build(key: str, _settings: Settings) -> Services:
    # `key` carries the settings into the cache key; the settings object itself is not hashed.
    return get_services(_settings)


def _fail(headline: str, error: Exception) -> NoReturn:
    st.error(f"{headline}\n\n{escape(str(error))}")
    st.stop()


def settings() -> Settings:
    try:
        return load_settings()
    except SettingsError as error:
        _fail("The settings cannot be used.", error)


def settings_file() -> Path:
    """Where settings are read from; mirrors ``load_settings``."""
    data_dir = os.environ.get("DOCANALYST_DATA_DIR", Settings.data_dir)
    return Path(os.environ.get("DOCANALYST_SETTINGS", Path(data_dir) / "settings.toml"))


def services() -> Services:
    current = settings()
    try:
        return _build(repr(current), current)
    except Exception as error:  # a bad model folder or database must explain itself, not crash the page
        _fail("The app could not start.", error)
