"""Start the app: build the demo checkpoint when no model is configured, then serve."""

from __future__ import annotations

import sys

from .settings import PROJECT_ROOT, load_settings


def ensure_model(settings) -> None:
    if settings.uses_demo_model and not (settings.demo_model_path / "config.json").is_file():
        from model.demo import DEMO_NOTICE, write_demo_checkpoint

        print(f"No model configured (DOCANALYST_MODEL): writing a demo checkpoint to {settings.demo_model_path}.")
        print(DEMO_NOTICE)
        write_demo_checkpoint(settings.demo_model_path)


def main(argv: list[str]) -> int:
    settings = load_settings()
    settings.data_path.mkdir(parents=True, exist_ok=True)
    ensure_model(settings)
    from kernels import build_native_kernels

    native = build_native_kernels()
    print("CPU kernels: " + (", ".join(name for name, ready in native.items() if ready) or "PyTorch paths only"))
    from streamlit.web import cli

    sys.argv = [
        "streamlit", "run", str(PROJECT_ROOT / "app" / "streamlit_app.py"),
        "--server.address", settings.host, "--server.port", str(settings.port),
        "--server.headless", "true", "--browser.gatherUsageStats", "false", "--client.toolbarMode", "minimal",
        "--server.maxUploadSize", str(settings.upload_limit_mb), *argv,
    ]
    return cli.main()


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
