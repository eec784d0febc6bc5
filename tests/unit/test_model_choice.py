from __future__ import annotations

import torch

from workers.cpu import cpu_flags, describe, vector_flags
from workers.model import pick_device, pick_dtype

CPUINFO = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse fma avx2 {extra}\nbugs\t\t: none\n"


def test_cpu_flags_are_read_from_cpuinfo():
    assert {"avx2", "avx512_bf16"} <= cpu_flags(CPUINFO.format(extra="avx512_bf16"))
    assert cpu_flags("") == set()


def test_the_cpu_is_described_by_its_name_and_vector_flags():
    assert vector_flags({"sse", "fma", "avx2", "avx512_bf16", "amx_tile"}) == ["amx_tile", "avx2", "avx512_bf16", "fma"]
    assert describe(CPUINFO.format(extra="avx512f")) == "CPU: AMD EPYC; vector flags: avx2 avx512f fma"
    assert describe("") == "CPU: unknown; vector flags: none"


def test_auto_dtype_follows_the_hardware():
    cpu = torch.device("cpu")
    assert pick_dtype("auto", cpu, flags={"avx2", "avx512_bf16"}, onednn_bf16=True)[0] is torch.bfloat16
    assert pick_dtype("auto", cpu, flags={"avx2", "amx_bf16"}, onednn_bf16=True)[0] is torch.bfloat16
    # Native bfloat16 that oneDNN is kept from (ONEDNN_MAX_CPU_ISA=AVX2): computed as on an AVX2 machine.
    dtype, why = pick_dtype("auto", cpu, flags={"avx2", "avx512_bf16"}, onednn_bf16=False)
    assert dtype is torch.float32 and "ONEDNN_MAX_CPU_ISA" in why
    dtype, why = pick_dtype("auto", cpu, flags={"avx2", "fma"})
    assert dtype is torch.float32 and "emulated" in why
    gpu = torch.device("cuda:0")
    assert pick_dtype("auto", gpu, cuda_bf16=True)[0] is torch.bfloat16
    assert pick_dtype("auto", gpu, cuda_bf16=False)[0] is torch.float16


def test_explicit_dtype_and_device_win():
    assert pick_dtype("float32", torch.device("cpu"), flags={"avx512_bf16"}) == (torch.float32, "set to float32")
    assert pick_device("cpu") == torch.device("cpu")
