"""What the CPU offers the engine: its feature flags, read without torch.

``python -m workers.cpu`` prints the CPU's name and vector flags (``make test``
starts with it, so that a log says on which kind of machine it ran).
"""

from __future__ import annotations

from pathlib import Path

# The CPU flags that decide the engine's dtype and kernels.
NATIVE_BF16 = frozenset({"avx512_bf16", "amx_bf16"})
VECTOR_PREFIXES = ("avx", "amx", "fma", "f16c")


def _cpuinfo(cpuinfo: str | None) -> str:
    if cpuinfo is not None:
        return cpuinfo
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _field(cpuinfo: str, name: str) -> str | None:
    for line in cpuinfo.splitlines():
        if line.split(":", 1)[0].strip() == name:
            return line.split(":", 1)[1].strip()
    return None


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none)."""
    flags = _field(_cpuinfo(cpuinfo), "flags")
    return set(flags.split()) if flags else set()


def vector_flags(flags: set[str]) -> list[str]:
    """The flags of vector instructions (AVX, AVX-512, AMX, FMA), sorted."""
    return sorted(f for f in flags if f.startswith(VECTOR_PREFIXES))


def describe(cpuinfo: str | None = None) -> str:
    """One line: the CPU's name and its vector flags."""
    text = _cpuinfo(cpuinfo)
    flags = vector_flags(cpu_flags(text))
    return f"CPU: {_field(text, 'model name') or 'unknown'}; vector flags: {' '.join(flags) or 'none'}"


if __name__ == "__main__":
    print(describe())
