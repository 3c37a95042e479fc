"""What the machine's processor can do natively, for the choices that depend on it (training and prediction
precision). Reads torch's own CPU capability checks (no /proc parsing)."""

from __future__ import annotations


def cpu_bf16() -> tuple[bool, str]:
    """(whether this CPU runs bfloat16 natively: AVX-512 BF16 or AMX instructions, what it has or lacks in words)."""
    import torch

    cpu = getattr(torch, "cpu", None)
    avx512_bf16 = bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)())
    amx = bool(getattr(cpu, "_is_amx_tile_supported", lambda: False)())
    if avx512_bf16 or amx:
        return True, f"this CPU has {' and '.join(n for n, f in (('AVX-512 BF16', avx512_bf16), ('AMX', amx)) if f)}"
    return False, "this CPU has neither AVX-512 BF16 nor AMX instructions (bfloat16 would be emulated, slower)"


def cpu_training_precision() -> str:
    """``${cpu_precision:}`` (conf/trainer/cpu.yaml): Lightning's ``bf16-mixed`` where the CPU runs bfloat16
    natively (a training step 1.07-1.11x faster on an AVX-512 BF16 EPYC, measured with a script; ``make bench``'s
    ``precision`` row times whole epochs and compares the calls), else ``32-true``."""
    return "bf16-mixed" if cpu_bf16()[0] else "32-true"
