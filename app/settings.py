"""Settings from environment variables or a TOML file; environment wins.

Every setting has an environment variable `DOCANALYST_<NAME>` and a key `<name>` in the
settings file (`DOCANALYST_SETTINGS`, default `<data folder>/settings.toml`).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


class SettingsError(ValueError):
    """A setting with a value that cannot be used."""


@dataclass(frozen=True)
class Settings:
    model: str = ""
    data_dir: str = str(PROJECT_ROOT / "data")
    database_url: str = ""
    device: str = "cpu"
    dtype: str = ""
    # How weights are held: "" keeps the checkpoint's format (FP8 and int8/int4 checkpoints stay
    # quantized); "bf16" dequantizes; "int8"/"int4" quantize the large layers while loading.
    weights: str = ""
    context_limit: int = 0
    # Memory tier of the model-state cache; -1: a quarter of the memory available at start-up
    # (app.services.state_cache.default_memory_budget), 0: none.
    memory_cache_mb: int = -1
    disk_cache_mb: int = 20480
    upload_limit_mb: int = 200
    host: str = "127.0.0.1"
    port: int = 8501
    prefill_chunk: int = 2048
    max_new_tokens: int = 1024
    # Drafts per speculative step with the checkpoint's MTP head; -1 picks (see services.container).
    draft_tokens: int = -1
    # Tesseract languages for scanned pages, joined by "+" (e.g. "eng+deu"); scripts/ocr.sh installs them.
    ocr_languages: str = "eng"
    # Uploads read at once (the rest wait in a queue), and the memory each reading process may use.
    read_workers: int = 2
    read_memory_mb: int = 3072
    # 1: read each added document into the model state cache in the background, so the first
    # question about it only reads itself; 0: documents are read when first asked about.
    read_ahead: int = 1

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).expanduser()

    @property
    def demo_model_path(self) -> Path:
        return self.data_path / "demo-model"

    @property
    def model_path(self) -> Path:
        """The configured checkpoint, or the demo checkpoint when none is configured."""
        return Path(self.model).expanduser() if self.model else self.demo_model_path

    @property
    def uses_demo_model(self) -> bool:
        return not self.model


def load_settings(environ: dict[str, str] | None = None) -> Settings:
    environ = dict(os.environ if environ is None else environ)
    values: dict[str, object] = {}
    data_dir = environ.get("DOCANALYST_DATA_DIR", Settings.data_dir)
    settings_file = Path(environ.get("DOCANALYST_SETTINGS", Path(data_dir) / "settings.toml"))
    if settings_file.is_file():
        try:
            values.update(tomllib.loads(settings_file.read_text(encoding="utf-8")))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SettingsError(f"Cannot read the settings file {settings_file}: {exc}") from exc
    known = {f.name: f for f in fields(Settings)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise SettingsError(f"Unknown settings in {settings_file}: {', '.join(unknown)}.")
    for name in known:
        env_value = environ.get(f"DOCANALYST_{name.upper()}")
        if env_value is not None:
            values[name] = env_value
    for name, value in list(values.items()):
        if known[name].type == "int":
            try:
                values[name] = int(value)
            except (TypeError, ValueError) as exc:
                raise SettingsError(f"Setting {name} must be a whole number, not {value!r}.") from exc
        else:
            values[name] = str(value)
    return Settings(**values)
