from __future__ import annotations

import torch

from workers.model import cpu_flags, pick_device, pick_dtype

CPUINFO = "processor\t: 0\nflags\t\t: fpu sse avx2 {extra}\nbugs\t\t: none\n"


def test_cpu_flags_are_read_from_cpuinfo():
    assert {"avx2", "avx512_bf16"} <= cpu_flags(CPUINFO.format(extra="avx512_bf16"))
    assert cpu_flags("") == set()


def test_auto_dtype_follows_the_hardware():
    cpu = torch.device("cpu")
    assert pick_dtype("auto", cpu, flags={"avx2", "avx512_bf16"})[0] is torch.bfloat16
    assert pick_dtype("auto", cpu, flags={"avx2", "amx_bf16"})[0] is torch.bfloat16
    dtype, why = pick_dtype("auto", cpu, flags={"avx2", "fma"})
    assert dtype is torch.float32 and "emulated" in why
    gpu = torch.device("cuda:0")
    assert pick_dtype("auto", gpu, cuda_bf16=True)[0] is torch.bfloat16
    assert pick_dtype("auto", gpu, cuda_bf16=False)[0] is torch.float16


def test_explicit_dtype_and_device_win():
    assert pick_dtype("float32", torch.device("cpu"), flags={"avx512_bf16"}) == (torch.float32, "set to float32")
    assert pick_device("cpu") == torch.device("cpu")
