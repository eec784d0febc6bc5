"""Loading the model once per worker process, on the device and dtype that suit it."""

from __future__ import annotations

import ctypes
import logging
import time
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from workers.cpu import NATIVE_BF16, cpu_flags
from workers.fusion import fuse_projections
from workers.kernels import mkl_mode, pack_linears, quantize_linears

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    model_id: str
    device: torch.device
    dtype: torch.dtype
    dtype_reason: str
    context_len: int
    eos_ids: frozenset[int]
    kernels: str = "plain linear layers"


def pick_device(setting: str) -> torch.device:
    if setting != "auto":
        return torch.device(setting)
    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


def onednn_takes_bf16() -> bool:
    """Whether oneDNN computes bfloat16 with the CPU's own instructions here (``ONEDNN_MAX_CPU_ISA`` may forbid it)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return torch.backends.mkldnn.is_available()


def pick_dtype(setting: str, device: torch.device, flags: set[str] | None = None,
               cuda_bf16: bool | None = None, onednn_bf16: bool | None = None) -> tuple[torch.dtype, str]:
    """Choose the weights' dtype and say why.

    bfloat16 where the hardware does it natively; float32 on CPUs that only
    emulate it (a batch decodes about 1.8x slower there than in float32), and
    where oneDNN is kept from the CPU's bfloat16 instructions
    (``ONEDNN_MAX_CPU_ISA=AVX2`` makes an AVX-512 machine compute as an AVX2 one).
    """
    if setting != "auto":
        return DTYPES[setting], f"set to {setting}"
    if device.type == "cuda":
        if cuda_bf16 is None:
            cuda_bf16 = torch.cuda.is_bf16_supported()
        if cuda_bf16:
            return torch.bfloat16, "GPU supports bfloat16"
        return torch.float16, "GPU lacks bfloat16, using float16"
    flags = cpu_flags() if flags is None else flags
    native = sorted(flags & NATIVE_BF16)
    if not native:
        return torch.float32, "CPU has no native bfloat16 (no avx512_bf16 or amx_bf16): bfloat16 would be emulated"
    if not (onednn_takes_bf16() if onednn_bf16 is None else onednn_bf16):
        return torch.float32, (f"CPU has native bfloat16 ({', '.join(native)}) but oneDNN may not use it here "
                               "(ONEDNN_MAX_CPU_ISA): bfloat16 would be emulated")
    return torch.bfloat16, f"CPU has native bfloat16 ({', '.join(native)})"


def release_freed_memory() -> None:
    """Hand the heap that loading freed back to the OS (glibc's ``malloc_trim``; elsewhere nothing).

    Loading, stacking and prepacking replace each weight with a new copy;
    glibc keeps the freed memory mapped, about 0.4-0.7 GB here.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def load_model(model_id: str, device_setting: str = "auto", dtype_setting: str = "auto",
               torch_threads: int = 0, prepack_rows: int = 16, fuse: bool = True,
               quantize: str = "none", float16_weights: bool = False) -> LoadedModel:
    """Load tokenizer and model from a local folder (or a cached model id) and log how.

    ``fuse`` stacks each Llama layer's query/key/value and gate/up projections
    (:func:`workers.fusion.fuse_projections`). ``prepack_rows`` > 0 prepacks a
    CPU model's linear layers for batches of about that many rows
    (:func:`workers.kernels.pack_linears`); 0 leaves them plain. ``quantize``
    "int8" or "int4" gives them quantized weights instead, all but the vocabulary
    projection (:func:`workers.kernels.quantize_linears`). ``float16_weights`` keeps the prepacked layers'
    weights in float16 where the model computes in float32 and they lose nothing by it
    (:class:`workers.kernels.Float16Linear`).
    """
    if torch_threads > 0:
        torch.set_num_threads(torch_threads)
    device = pick_device(device_setting)
    dtype, reason = pick_dtype(dtype_setting, device)
    started = time.monotonic()
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id)
        model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype).to(device)
    except Exception:
        logger.exception("Could not load model %s on %s", model_id, device)
        raise
    model.eval()
    fusion = fuse_projections(model) if fuse else "projections as transformers ships them (fusing off)"
    if quantize != "none":
        packing = quantize_linears(model, quantize, head=model.get_output_embeddings())
        if prepack_rows > 0:  # the vocabulary projection, left in the model's dtype
            packing += "; the vocabulary projection: " + pack_linears(model, prepack_rows)
    elif prepack_rows > 0:
        packing = pack_linears(model, prepack_rows, float16=float16_weights)
    else:
        packing = "plain linear layers (prepacking off)"
    kernels = f"{fusion}, {packing}"
    mkl = mkl_mode() if device.type == "cpu" else None
    if mkl is not None:
        strict, setting = mkl
        kernels += f", MKL rounding {'alike wherever' if strict else 'by where'} its operands lie (MKL_CBWR={setting})"
        if not strict:
            logger.warning("MKL is not in its strict reproducible mode (MKL_CBWR=%s; set before torch's first matrix "
                           "product, see workers/__init__.py): a request's greedy text may depend on its batch",
                           setting)
    release_freed_memory()
    eos = model.generation_config.eos_token_id
    eos_ids = frozenset(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    context_len = int(getattr(model.config, "max_position_embeddings", 2048))
    logger.info("Loaded model %s on %s as %s (%s) in %.2fs, %d torch threads, context %d tokens, %s",
                model_id, device, str(dtype).removeprefix("torch."), reason, time.monotonic() - started,
                torch.get_num_threads(), context_len, kernels)
    return LoadedModel(model, tokenizer, model_id, device, dtype, reason, context_len,
                       frozenset(i for i in eos_ids if i is not None), kernels)
