"""Model: which checkpoint answers, where it runs, what it costs in memory, how well caching works."""

import streamlit as st

from app.ui import activity, context
from app.ui.text import human_bytes, number

FORMAT_NAMES = {"fp8_block": "FP8 (128x128 blocks)", "int8": "int8", "int4": "int4 (groups of 128)",
                "bfloat16": "bf16", "float32": "fp32"}


def weight_formats(formats: tuple[str, ...]) -> str:
    """How the weights are held, the quantized format first: "int4 (groups of 128) + bf16"."""
    quantized = [FORMAT_NAMES.get(f, f) for f in formats if f in ("fp8_block", "int8", "int4")]
    dense = [FORMAT_NAMES.get(f, f) for f in formats if f not in ("fp8_block", "int8", "int4")]
    return " + ".join(quantized + dense)


services = context.services()
info = services.analysis.model_info()
cache = services.analysis.cache_stats()

st.title("Model")
activity.sidebar(services)
if info.is_demo:
    st.warning(
        f"**The demo checkpoint is in use: its answers are meaningless.** {info.notice}\n\n"
        "Set the environment variable `DOCANALYST_MODEL` to a Qwen3-Next, Qwen3.5 or Qwen3.6 checkpoint folder, or put "
        f'`model = "/path/to/checkpoint"` in the settings file (`{context.settings_file()}`), '
        "then restart the app.",
        icon=":material/warning:",
    )

st.subheader("Checkpoint")
st.code(info.path, language=None)
st.caption(f"Model family: **{info.family}**")
device, dtype, weights, context_limit = st.columns(4)
device.metric("Device", info.device)
dtype.metric("Compute precision", info.dtype)
weights.metric("Weights in memory", human_bytes(info.parameter_bytes), weight_formats(info.weight_formats),
               delta_color="off", delta_arrow="off")
context_limit.metric("Context (tokens)", number(info.context_limit))
st.caption(f"Fingerprint {info.fingerprint}")

st.subheader("Model state cache")
st.caption("Documents already read are kept as model states, so later questions skip re-reading them.")
memory, disk, hit_rate = st.columns(3)
quiet = {"delta_color": "off", "delta_arrow": "off"}
memory.metric("In memory", human_bytes(cache.memory_bytes), f"{cache.memory_entries} states", **quiet)
disk.metric("On disk", human_bytes(cache.disk_bytes), f"{cache.disk_entries} states", **quiet)
hit_rate.metric("Hit rate", f"{cache.hit_rate:.0%}", f"{cache.hits} hits · {cache.misses} misses", **quiet)
