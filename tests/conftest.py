"""Shared fixtures: checkpoints written by the demo writer and by the transformers oracle."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def demo_checkpoint(tmp_path_factory) -> Path:
    from model.demo import write_demo_checkpoint

    return write_demo_checkpoint(tmp_path_factory.mktemp("demo") / "ckpt", seed=0)


@pytest.fixture(scope="module")
def services(demo_checkpoint, tmp_path_factory):
    """The app's services on the demo checkpoint, in a data folder of the test module's own."""
    from app.services.container import get_services
    from app.settings import load_settings

    with pytest.MonkeyPatch.context() as patch:
        for name in [n for n in os.environ if n.startswith("DOCANALYST_")]:
            patch.delenv(name)
        patch.setenv("DOCANALYST_DATA_DIR", str(tmp_path_factory.mktemp("app-data")))
        patch.setenv("DOCANALYST_MODEL", str(demo_checkpoint))
        patch.setenv("DOCANALYST_MAX_NEW_TOKENS", "4")
        yield get_services(load_settings())
