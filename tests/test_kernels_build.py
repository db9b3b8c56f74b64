"""Every C kernel builds for every instruction set it declares, whatever this CPU runs, so a build
break is caught on any machine with a C compiler; and the binding picks builds as documented."""

from __future__ import annotations

import importlib
import os
import pkgutil
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import kernels
from kernels import native


def _bound_kernels() -> list[native.Kernel]:
    found: dict[tuple[Path, str], native.Kernel] = {}
    for module_info in pkgutil.walk_packages(kernels.__path__, prefix="kernels."):
        if "triton" in module_info.name:
            continue
        module = importlib.import_module(module_info.name)
        for value in vars(module).values():
            if isinstance(value, native.Kernel):
                found[(value.source, value.function)] = value
    return sorted(found.values(), key=repr)


KERNELS = _bound_kernels()
VARIANTS = [(kernel, isa) for kernel in KERNELS for isa in kernel.isas]


def test_every_c_source_is_bound():
    sources = {kernel.source.resolve() for kernel in KERNELS}
    on_disk = {path.resolve() for path in Path(kernels.__file__).parent.rglob("*.c")}
    assert on_disk - sources == set(), "C sources without a Kernel binding (so never built or tested)"


@pytest.mark.skipif(native.compiler() is None, reason="no C compiler")
@pytest.mark.parametrize("kernel, isa", VARIANTS, ids=[f"{k.source.stem}.{k.function}-{isa}" for k, isa in VARIANTS])
def test_variant_builds(kernel, isa):
    library = native.build(kernel.source, isa)
    assert library.exists() and kernel.function.encode() in library.read_bytes()


# How a C parameter's type reads as a Kernel signature code (native._ARGUMENT_TYPES); any pointer is "p".
C_TYPE_CODES = {"int64_t": "i", "int": "n", "float": "f"}


def c_signature(kernel: native.Kernel) -> str:
    """The signature codes of the kernel's C function, read from its definition in the source."""
    definition = re.search(rf"^(?:void|int) {kernel.function}\(([^)]*)\)", kernel.source.read_text(), re.MULTILINE)
    assert definition, f"no definition of {kernel.function} in {kernel.source.name}"
    words = [parameter.replace("*", " * ").split() for parameter in definition.group(1).split(",")]
    return "".join("p" if "*" in w else C_TYPE_CODES[w[1] if w[0] == "const" else w[0]] for w in words)


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: f"{k.source.stem}.{k.function}")
def test_binding_signature_is_the_c_definitions(kernel):
    """A code that disagrees with the C type can still work by accident of the calling convention
    (an int passed as a pointer), until a pointer argument is passed where an integer is declared."""
    assert kernel.signature == c_signature(kernel)


# Legacy prefixes that may come before an instruction's opcode bytes; in 64-bit mode a first opcode
# byte of 0x62 is the EVEX prefix, which only AVX-512 instructions have.
LEGACY_PREFIXES = {0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, 0x66, 0x67, 0xF0, 0xF2, 0xF3}
EVEX = 0x62
AMX_MNEMONIC = re.compile(r"(ldtilecfg|sttilecfg|tilerelease|tilezero|tileload|tilestore|tdp)")


def disassembly(library: Path) -> list[tuple[str, str]]:
    """(encoding bytes in hex, instruction) for each instruction of `library`, as objdump lists them
    (labels, blank lines and the second line of a long instruction's bytes left out)."""
    listing = subprocess.run(["objdump", "-d", "--no-addresses", str(library)], capture_output=True, text=True,
                             check=True).stdout
    return [(fields[1], fields[2]) for fields in (line.split("\t") for line in listing.splitlines())
            if len(fields) >= 3]


def beyond_avx2(library: Path) -> list[str]:
    """The instructions of `library` that a CPU with AVX2 but without AVX-512 or AMX cannot run:
    EVEX-encoded (AVX-512, at any vector width) and AMX tile instructions, as objdump shows them."""
    found = []
    for encoding, instruction in disassembly(library):
        opcode = next((byte for byte in (int(word, 16) for word in encoding.split()) if byte not in LEGACY_PREFIXES),
                      None)
        if opcode == EVEX or AMX_MNEMONIC.match(instruction):
            found.append(instruction.strip())
    return found


needs_objdump = pytest.mark.skipif(native.compiler() is None or shutil.which("objdump") is None,
                                   reason="needs a C compiler and objdump (binutils)")


# Instructions of AVX-512 extensions newer than Skylake-SP's (F, CD, BW, DQ, VL): BF16, VNNI, VBMI
# and VBMI2, IFMA, BITALG and VPOPCNTDQ, VP2INTERSECT.
NEWER_AVX512_MNEMONIC = re.compile(r"(vdpbf16ps|vcvtne2ps2bf16|vcvtneps2bf16|vpdpbusd|vpdpwssd|vpermb|vpermi2b|"
                                   r"vpermt2b|vpmultishiftqb|vpmadd52|vpopcnt|vpshufbitqmb|vpcompress[bw]|"
                                   r"vpexpand[bw]|vpshld|vpshrd|vp2intersect)")


def beyond_avx512f(library: Path) -> list[str]:
    """The instructions of `library` that a CPU with AVX-512 as Skylake-SP has it cannot run: those
    of the later AVX-512 extensions and AMX tile instructions."""
    return [instruction.strip() for _, instruction in disassembly(library)
            if NEWER_AVX512_MNEMONIC.match(instruction) or AMX_MNEMONIC.match(instruction)]


@needs_objdump
def test_the_instruction_scan_finds_avx512_and_amx(tmp_path):
    source = tmp_path / "probe.c"
    source.write_text("#include <immintrin.h>\n"
                      "void probe(float *x) {\n"
                      "#if defined(__AVX512F__)\n"
                      "    _mm512_storeu_ps(x, _mm512_add_ps(_mm512_loadu_ps(x), _mm512_loadu_ps(x + 16)));\n"
                      "    _tile_release();\n"
                      "#else\n"
                      "    __m256 a = _mm256_loadu_ps(x);\n"
                      "    _mm256_storeu_ps(x, _mm256_fmadd_ps(a, a, a));\n"
                      "#endif\n"
                      "}\n")
    found = beyond_avx2(native.build(source, "avx512"))
    assert any("zmm" in instruction for instruction in found) and any("tilerelease" in i for i in found)
    assert beyond_avx2(native.build(source, "avx2")) == []


@needs_objdump
def test_the_instruction_scan_finds_bf16_products(tmp_path):
    source = tmp_path / "probe.c"
    source.write_text("#include <immintrin.h>\n"
                      "void probe(float *x) {\n"
                      "    __m512 a = _mm512_loadu_ps(x);\n"
                      "#if defined(__AVX512BF16__)\n"
                      "    __m512bh b = _mm512_cvtne2ps_pbh(a, a);\n"
                      "    a = _mm512_dpbf16_ps(a, b, b);\n"
                      "#endif\n"
                      "    _mm512_storeu_ps(x, _mm512_fmadd_ps(a, a, a));\n"
                      "}\n")
    assert {"vcvtne2ps2bf16", "vdpbf16ps"} <= {i.split()[0] for i in beyond_avx512f(native.build(source, "avx512"))}
    assert beyond_avx512f(native.build(source, "avx512f")) == []


# Several kernels are functions of one source, built once per instruction set.
AVX2_SOURCES = sorted({kernel.source for kernel in KERNELS if "avx2" in kernel.isas})


@needs_objdump
@pytest.mark.parametrize("source", AVX2_SOURCES, ids=lambda source: source.stem)
def test_avx2_builds_hold_no_avx512_or_amx_instruction(source):
    """Forcing the AVX2 builds on an AVX-512 CPU would not notice one: the instruction runs there."""
    assert beyond_avx2(native.build(source, "avx2"))[:5] == []


AVX512F_SOURCES = sorted({kernel.source for kernel in KERNELS if "avx512f" in kernel.isas})


@needs_objdump
@pytest.mark.parametrize("source", AVX512F_SOURCES, ids=lambda source: source.stem)
def test_avx512f_builds_hold_no_newer_avx512_or_amx_instruction(source):
    assert beyond_avx512f(native.build(source, "avx512f"))[:5] == []


def test_older_builds_are_offered_where_avx512_runs():
    order = native.isa_order()
    if native.cpu_runs("avx512") and not os.environ.get("DOCANALYST_ISA"):
        assert order == ("avx512", "avx512f", "avx2")
    with native.use_isa("avx512f"):
        assert native.isa_order() == tuple(isa for isa in ("avx512f", "avx2") if native.cpu_runs(isa))
        # A kernel without a build for AVX-512 without BF16 (or on a CPU without AVX-512) runs its AVX2 one.
        runs_avx512f = native.cpu_runs("avx512f")
        assert all(kernel.isa() in (None, "avx512f" if "avx512f" in kernel.isas and runs_avx512f else "avx2")
                   for kernel in KERNELS)
        assert not native.native_bf16_matmul() and not native.matmul_has_amx()
    with native.use_isa("avx2"):
        assert native.isa_order() == (("avx2",) if native.cpu_runs("avx2") else ())
        assert all(kernel.isa() in (None, "avx2") for kernel in KERNELS)
    assert native.isa_order() == order


def test_a_call_runs_the_build_of_the_current_choice():
    """Kernel calls keep their resolved build between calls, and take the new one when the choice
    changes (use_isa, as DOCANALYST_ISA would for a whole process)."""
    from kernels.quant.native import _LANES

    def lanes_called() -> int:
        value = torch.zeros(1, dtype=torch.int32)
        _LANES(value)
        return int(value)

    runnable = [isa for isa in native.ISAS if _LANES.entry(isa) is not None]
    if not runnable:
        pytest.skip("no build of the kernels runs here")
    widths = {"avx512": 16, "avx512f": 16, "avx2": 8}
    default = lanes_called()
    for isa in runnable:
        with native.use_isa(isa):
            assert lanes_called() == widths[isa] and lanes_called() == widths[isa]
        assert lanes_called() == default
    assert default == widths[_LANES.isa()]


def test_unknown_isa_is_refused(monkeypatch):
    monkeypatch.setenv("DOCANALYST_ISA", "avx9")
    with native.use_isa(None), pytest.raises(ValueError, match="DOCANALYST_ISA"):
        native.isa_order()


@pytest.mark.parametrize("hidden", list(native.ISAS))
def test_a_set_cpuid_does_not_report_is_not_run(monkeypatch, hidden):
    """An emulated CPU (QEMU's -cpu Haswell) hides AVX-512 from the CPUID instruction while
    /proc/cpuinfo shows the host's flags: the kernels follow CPUID, as PyTorch's own kernels do."""
    monkeypatch.setattr(native.torch.cpu, native.ISAS[hidden].cpuid_probe, lambda: False)
    native._torch_cpu_reports.cache_clear()
    try:
        with native.use_isa(None):
            assert not native.cpu_runs(hidden) and hidden not in native.isa_order()
            if hidden == "avx512":
                assert not native.native_bf16_matmul() and not native.matmul_has_amx()
            assert all(kernel.isa() != hidden for kernel in KERNELS)
    finally:
        monkeypatch.undo()
        native._torch_cpu_reports.cache_clear()
        native._set_forced_isa(None)


@pytest.mark.parametrize("vendor", ["AuthenticAMD", "GenuineIntel"])
def test_int4_pair_products_are_preferred_on_amds_avx512_cpus(monkeypatch, vendor):
    """AMD runs the bf16 pair dot product at the FMA's rate, Intel at half of it; the AVX2 build has
    none; DOCANALYST_INT4_PAIRS decides where it is set."""
    def preferred() -> bool:
        native.int4_pairs_preferred.cache_clear()
        return native.int4_pairs_preferred()

    monkeypatch.delenv("DOCANALYST_INT4_PAIRS", raising=False)
    monkeypatch.setattr(native, "_cpu_vendor", lambda: vendor)
    monkeypatch.setattr(native, "isa_order", lambda: ("avx512", "avx2"))
    try:
        assert preferred() is (vendor == "AuthenticAMD")
        monkeypatch.setattr(native, "isa_order", lambda: ("avx2",))
        assert preferred() is False
        for value in ("0", "1"):
            monkeypatch.setenv("DOCANALYST_INT4_PAIRS", value)
            assert preferred() is (value == "1")
    finally:
        monkeypatch.undo()
        native.int4_pairs_preferred.cache_clear()


def test_the_int4_method_is_part_of_the_numerics_identity(monkeypatch):
    """States computed with the table's bits are not taken for pair products' bits, or the reverse."""
    identities = set()
    try:
        for value in ("0", "1"):
            monkeypatch.setenv("DOCANALYST_INT4_PAIRS", value)
            native.int4_pairs_preferred.cache_clear()
            native.numerics_identity.cache_clear()
            identities.add(native.numerics_identity())
    finally:
        monkeypatch.undo()
        native.int4_pairs_preferred.cache_clear()
        native.numerics_identity.cache_clear()
    assert len(identities) == 2
