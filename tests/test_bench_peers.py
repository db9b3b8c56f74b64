"""bench/peers.py builds llama.cpp with the x86 extensions this CPU runs, and only those."""

import pytest

from bench.peers import ISA_CPU_FLAGS, ISA_SWITCHES, llama_cpp_switches

ZEN4 = {"avx", "avx2", "fma", "f16c", "bmi2", "avx512f", "avx512bw", "avx512vl", "avx512vbmi", "avx512_vnni",
        "avx512_bf16"}
SAPPHIRE_RAPIDS = ZEN4 | {"avx_vnni", "amx_tile", "amx_bf16", "amx_int8"}


@pytest.mark.parametrize(("flags", "expected"), [
    pytest.param(ZEN4, ["GGML_AVX", "GGML_AVX2", "GGML_FMA", "GGML_F16C", "GGML_BMI2", "GGML_AVX512",
                        "GGML_AVX512_VBMI", "GGML_AVX512_VNNI", "GGML_AVX512_BF16"], id="zen4-without-avx-vnni"),
    pytest.param(SAPPHIRE_RAPIDS, ISA_SWITCHES["avx512"], id="xeon-with-every-extension"),
])
def test_avx512_build_has_only_what_the_cpu_runs(flags, expected):
    assert llama_cpp_switches("avx512", flags) == expected


@pytest.mark.parametrize("flags", [pytest.param(ZEN4, id="zen4"), pytest.param(SAPPHIRE_RAPIDS, id="xeon")])
def test_avx2_build_leaves_out_every_avx512_extension(flags):
    assert llama_cpp_switches("avx2", flags) == ["GGML_AVX", "GGML_AVX2", "GGML_FMA", "GGML_F16C", "GGML_BMI2"]


@pytest.mark.parametrize("flags", [pytest.param(ZEN4, id="zen4"), pytest.param(SAPPHIRE_RAPIDS, id="xeon")])
def test_avx512f_build_is_skylake_sps_set(flags):
    assert llama_cpp_switches("avx512f", flags) == ["GGML_AVX", "GGML_AVX2", "GGML_FMA", "GGML_F16C", "GGML_BMI2",
                                                    "GGML_AVX512"]


ZEN3 = {"avx", "avx2", "fma", "f16c", "bmi2"}
ALDER_LAKE = ZEN3 | {"avx_vnni"}


@pytest.mark.parametrize(("flags", "expected"), [
    pytest.param(ZEN3, ISA_SWITCHES["avx2"], id="zen3"),
    pytest.param(ALDER_LAKE, ISA_SWITCHES["avx2"] + ["GGML_AVX_VNNI"], id="intel-client-with-avx-vnni"),
    pytest.param(ZEN4, ISA_SWITCHES["avx2"] + ["GGML_AVX512", "GGML_AVX512_VBMI", "GGML_AVX512_VNNI",
                                                "GGML_AVX512_BF16"], id="zen4"),
])
def test_default_build_has_everything_the_cpu_runs(flags, expected):
    assert llama_cpp_switches("native", flags) == expected


def test_default_runs_on_a_cpu_without_avx512():
    assert not ISA_CPU_FLAGS["native"] - ZEN3
    assert ISA_CPU_FLAGS["avx512"] - ZEN3
