"""Shared fixtures: checkpoints written by the demo writer and by the transformers oracle."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# What tests of the decode-exact paths need, for their skip messages.
NATIVE_KERNELS = "the native kernels (a C compiler, a CPU with AVX2 or AVX-512, DOCANALYST_NATIVE not 0)"


def pytest_collection_modifyitems(config, items):
    """Under QEMU's user-mode emulation (scripts/emulated-cpu.sh) /proc/self/maps, madvise and the
    resident size are the emulator's, and everything runs ~10x slower than the browser tests wait."""
    cpu = os.environ.get("DOCANALYST_EMULATED_CPU")
    if cpu:
        skip = pytest.mark.skip(reason=f"on an emulated CPU ({cpu}): needs the host's own process or speed")
        for item in items:
            if "host_process" in item.keywords or "browser" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def demo_checkpoint(tmp_path_factory) -> Path:
    from model.demo import write_demo_checkpoint

    return write_demo_checkpoint(tmp_path_factory.mktemp("demo") / "ckpt", seed=0)


@pytest.fixture(scope="session")
def qwen35_demo_checkpoint(tmp_path_factory) -> Path:
    """The Qwen3.5-shaped demo checkpoint (published vision-language layout, 248K vocabulary, MTP)."""
    from model.demo import write_demo_checkpoint

    return write_demo_checkpoint(tmp_path_factory.mktemp("demo-qwen35") / "ckpt", seed=0, family="qwen3_5")


def app_services(checkpoint: Path, tmp_path_factory, **settings: str):
    """The app's services on `checkpoint`, in a data folder of the caller's own."""
    from app.services.container import get_services
    from app.settings import load_settings

    with pytest.MonkeyPatch.context() as patch:
        for name in [n for n in os.environ if n.startswith("DOCANALYST_")]:
            patch.delenv(name)
        patch.setenv("DOCANALYST_DATA_DIR", str(tmp_path_factory.mktemp("app-data")))
        patch.setenv("DOCANALYST_MODEL", str(checkpoint))
        patch.setenv("DOCANALYST_MAX_NEW_TOKENS", "4")
        for name, value in settings.items():
            patch.setenv(f"DOCANALYST_{name}", value)
        yield get_services(load_settings())


@pytest.fixture(scope="module")
def services(demo_checkpoint, tmp_path_factory):
    """The app's services on the demo checkpoint, in a data folder of the test module's own."""
    yield from app_services(demo_checkpoint, tmp_path_factory)


@pytest.fixture(params=["avx512", "avx512f", "avx2"])
def native_isa(request) -> str:
    """Each instruction set's kernel builds in turn (the older sets' on newer CPUs too; a kernel
    without a build for one runs its next); skipped for a set this CPU does not run."""
    from kernels import native

    if request.param not in native.isa_order():
        pytest.skip(f"this CPU does not run {request.param} code")
    # A module marked native_kernels(k, ...) tests those kernels: a set none of them is built for
    # would run the next set's builds again.
    marker = request.node.get_closest_marker("native_kernels")
    if marker is not None and not any(request.param in kernel.isas for kernel in marker.args):
        pytest.skip(f"no {request.param} build of these kernels: the next set's runs, tested under its name")
    with native.use_isa(request.param):
        yield request.param
