"""Tests of .ci/ptxas_report.py, the register / spill report of the CUDA build, on made-up logs.

The logs imitate what ``nvcc -Xptxas -v`` prints under torch's ninja build: one block
per compile command after its ``[k/n]`` line, one ptxas run per architecture inside it.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("ptxas_report", ROOT / ".ci" / "ptxas_report.py")
ptxas_report = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = ptxas_report  # dataclasses look their module up while it executes
_spec.loader.exec_module(ptxas_report)

HAS_CXXFILT = shutil.which("c++filt") is not None

FWD_FLOAT = "_ZN6kdfast22kd_loss_forward_kernelIfLi64EEEvPKT_Pfl"  # kd_loss_forward_kernel<float, 64>
FWD_BF16 = "_ZN6kdfast22kd_loss_forward_kernelIN3c108BFloat16ELi64EEEvPKT_Pfl"
OTHER = "_ZN5other4scanEPf"  # other::scan(float*), not a kdfast kernel
HELPER = "_ZN6kdfast6helperEf"  # kdfast::helper(float), a device function kept out of line


def ptxas_run(arch: str, kernels: list, device_functions: tuple = ()) -> str:
    """The -v output of one ptxas run; kernels are (mangled, registers, stack, spill stores, spill loads)."""
    lines = ["ptxas info    : 0 bytes gmem"]
    for name, regs, stack, stores, loads in kernels:
        lines += [f"ptxas info    : Compiling entry function '{name}' for '{arch}'",
                  f"ptxas info    : Function properties for {name}",
                  f"    {stack} bytes stack frame, {stores} bytes spill stores, {loads} bytes spill loads",
                  f"ptxas info    : Used {regs} registers, used 1 barriers, 392 bytes cmem[0]",
                  "ptxas info    : Compile time = 12.5 ms"]
    for name in device_functions:
        lines += [f"ptxas info    : Function properties for {name}",
                  "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads"]
    return "\n".join(lines)


def ninja_block(step: str, source: str, *runs: str) -> str:
    cmd = (f"[{step}] /usr/local/cuda/bin/nvcc -MD -MF build/{source}.o.d -I/x/include -c -c "
           f"/src/csrc/cuda/{source} -o build/{source}.o -O3 -Xptxas -v "
           "-gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90")
    return "\n".join([cmd, *runs])


def clean_log() -> str:
    return "\n".join([
        "kdfast: building CUDA kernels for ['8.0', '9.0']",
        "[1/3] c++ -MMD -MF build/kdfast.o.d -c /src/csrc/kdfast.cpp -o build/kdfast.o -O3",
        ninja_block("2/3", "kd_loss.cu",
                    ptxas_run("sm_80", [(FWD_FLOAT, 40, 0, 0, 0), (FWD_BF16, 38, 0, 0, 0)], (HELPER,)),
                    ptxas_run("sm_90", [(FWD_FLOAT, 42, 0, 0, 0), (FWD_BF16, 40, 0, 0, 0)], (HELPER,))),
        # a kernel that spills but is not a kdfast kernel: reported, not a failure
        ninja_block("3/3", "scan.cu", ptxas_run("sm_90", [(OTHER, 255, 64, 32, 32)])),
        "g++ -shared ... -o kdfast/_C.so",
    ])


def spilling_log() -> str:
    return ninja_block("1/1", "kd_loss.cu",
                       ptxas_run("sm_80", [(FWD_FLOAT, 64, 16, 12, 20), (FWD_BF16, 38, 0, 0, 0)]),
                       ptxas_run("sm_90", [(FWD_FLOAT, 64, 0, 0, 0), (FWD_BF16, 40, 0, 0, 0)]))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "build.log"
    path.write_text(text + "\n")
    return path


def test_parse_every_kernel_with_arch_and_source():
    kernels = ptxas_report.parse_log(clean_log().splitlines())
    got = {(k.mangled, k.arch): k for k in kernels}
    assert len(kernels) == 7  # 2 kernels x 2 archs + helper x 2 archs + scan
    fwd = got[(FWD_FLOAT, "sm_90")]
    assert (fwd.registers, fwd.stack_bytes, fwd.spill_store_bytes, fwd.spill_load_bytes) == (42, 0, 0, 0)
    assert fwd.entry and fwd.source == "kd_loss.cu"
    helper = got[(HELPER, "sm_80")]
    assert not helper.entry and helper.registers is None and helper.stack_bytes == 0
    scan = got[(OTHER, "sm_90")]
    assert (scan.source, scan.registers, scan.spill_store_bytes) == ("scan.cu", 255, 32)


def test_device_function_before_first_entry_gets_the_run_arch():
    log = "\n".join(["ptxas info    : 0 bytes gmem",
                     f"ptxas info    : Function properties for {HELPER}",
                     "    8 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads",
                     ptxas_run("sm_90", [(FWD_FLOAT, 40, 0, 0, 0)]).split("\n", 1)[1]])
    kernels = ptxas_report.parse_log(log.splitlines())
    assert {(k.mangled, k.arch) for k in kernels} == {(HELPER, "sm_90"), (FWD_FLOAT, "sm_90")}


def test_indented_log_from_pip_verbose():
    log = "\n".join("  " + line for line in clean_log().splitlines())
    kernels = ptxas_report.parse_log(log.splitlines())
    assert len(kernels) == 7 and {k.source for k in kernels} == {"kd_loss.cu", "scan.cu"}


def test_repeated_log_is_deduplicated():
    log = clean_log()
    assert len(ptxas_report.parse_log((log + "\n" + log).splitlines())) == 7


def test_clean_log_passes(tmp_path, capsys):
    assert ptxas_report.main([str(write(tmp_path, clean_log()))]) == 0
    out = capsys.readouterr().out
    assert "registers" in out and "spill stores B" in out
    assert "ok: no kernel whose name contains 'kdfast' spills" in out
    assert "5 kernel instantiations, 2 out-of-line device functions, archs sm_80, sm_90" in out
    if HAS_CXXFILT:
        # two sources: each row says which
        assert "kd_loss.cu: kd_loss_forward_kernel<bf16, 64>" in out
        assert "kd_loss.cu: kd_loss_forward_kernel<float, 64>" in out
        assert "scan.cu: scan(float*)" in out
        assert "helper(float) (device function)" in out


def test_spilling_kd_loss_kernel_fails(tmp_path, capsys):
    assert ptxas_report.main([str(write(tmp_path, spilling_log()))]) == 1
    out = capsys.readouterr().out
    assert "FAIL: 1 kernel(s) whose name contains 'kdfast' spill" in out
    expected = "kd_loss_forward_kernel<float, 64>" if HAS_CXXFILT else FWD_FLOAT
    assert f"sm_80: {'void kdfast::' if HAS_CXXFILT else ''}{expected}" in out
    assert "12 bytes spill stores, 20 bytes spill loads, 64 registers" in out


def test_fail_on_other_substring(tmp_path):
    log = write(tmp_path, clean_log())
    assert ptxas_report.main([str(log), "--fail-on", "scan"]) == 1


def test_log_without_ptxas_output_is_an_error(tmp_path, capsys):
    log = write(tmp_path, "[1/1] c++ -c csrc/kdfast.cpp -o kdfast.o\nbuilt")
    assert ptxas_report.main([str(log)]) == 2
    assert "KDFAST_PTXAS_VERBOSE=1" in capsys.readouterr().err
    assert ptxas_report.main([str(tmp_path / "missing.log")]) == 2


def test_markdown_table(tmp_path, capsys):
    assert ptxas_report.main([str(write(tmp_path, spilling_log())), "--format", "markdown"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| kernel | arch | registers | stack B | spill stores B | spill loads B |"
    assert lines[1] == "| --- | --- | --- | --- | --- | --- |"
    assert any(line.endswith("| sm_80 | 64 | 16 | 12 | 20 |") for line in lines)


def test_without_cxxfilt_names_stay_mangled(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ptxas_report.shutil, "which", lambda name: None)
    assert ptxas_report.main([str(write(tmp_path, spilling_log()))]) == 1
    assert FWD_FLOAT in capsys.readouterr().out


@pytest.mark.parametrize("demangled, short", [
    ("void kdfast::cuda::(anonymous namespace)::kd_loss_forward_kernel<(kdfast::Divergence)0, "
     "c10::BFloat16, c10::Half, float>(kdfast::KdLossParams, int, float*)",
     "kd_loss_forward_kernel<(Divergence)0, bf16, fp16, float>"),
    ("_INTERNAL_6c977de0_4_t_cu::kdfast::(anonymous namespace)::helper(float)", "helper(float)"),
    ("kdfast::scan(float*)", "scan(float*)"),
    ("void kdfast::k<float, 4>(kdfast::P<float, 4>, long)", "k<float, 4>"),
])
def test_shorten(demangled, short):
    assert ptxas_report.shorten(demangled) == short


@pytest.mark.skipif(not HAS_CXXFILT, reason="c++filt is not installed")
def test_template_overloads_keep_their_parameters():
    # k<float>(float*) and k<float>(float*, int) would both read k<float>
    kernels = [ptxas_report.KernelInfo(mangled=m, arch="sm_90", entry=True)
               for m in ("_ZN6kdfast1kIfEEvPT_", "_ZN6kdfast1kIfEEvPT_i", FWD_FLOAT)]
    ptxas_report.name_kernels(kernels)
    assert [k.short_name for k in kernels] == ["k<float>(float*)", "k<float>(float*, int)",
                                               "kd_loss_forward_kernel<float, 64>"]
