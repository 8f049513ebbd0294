"""Build the C++ kernels on first use (JIT, cached on disk) and decide which path runs.

Paths, best first: "avx512" (AVX-512 VNNI), "avx2" (AVX2 + FMA + F16C), "ref" (the scalar C++
reference, for tests), "torch" (dequantize to float32 and multiply; no compiler needed). The
best path the CPU runs is chosen unless `KVLM_KERNELS` names one (torch|ref|avx2|avx512|auto).
One line on stderr says which path runs and why; another, once, when the extension compiles.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

ENV_VAR = "KVLM_KERNELS"
CACHE_ENV_VAR = "KVLM_KERNELS_CACHE"
PATHS = ("avx512", "avx2", "ref", "torch")  # best first
SIMD_PATHS = ("avx512", "avx2")  # the paths faster than dequantizing to float
ISA_CODES = {"ref": 1, "avx2": 2, "avx512": 3}
_ISA_NAMES = {code: name for name, code in ISA_CODES.items()}
_CSRC = Path(__file__).parent / "csrc"
_SOURCES = (
    "ops.cpp",
    "qgemm_ref.cpp",
    "qgemm_avx2.cpp",
    "qgemm_avx512.cpp",
    "qgemm_amx.cpp",
    "decode_math_avx2.cpp",
    "decode_plan.cpp",
    "paged_attention.cpp",
    "paged_attention_ref.cpp",
    "paged_attention_avx2.cpp",
    "paged_attention_avx512.cpp",
    "paged_prefill.cpp",
    "paged_prefill_ref.cpp",
    "paged_prefill_avx2.cpp",
    "paged_prefill_avx512.cpp",
    "token_bitmask.cpp",
)


class KernelUnavailableError(RuntimeError):
    """A kernel path was asked for (KVLM_KERNELS or an argument) that cannot run here."""


@dataclass(frozen=True)
class KernelStatus:
    path: str  # the default path: one of PATHS
    reason: str  # why, in words a user can act on
    available: tuple[str, ...]  # every path this machine runs, best first


def _cache_dir() -> Path:
    digest = hashlib.sha256()
    for path in sorted(_CSRC.glob("*.[ch]*")):  # every source and header
        digest.update(path.name.encode() + path.read_bytes())
    root = os.environ.get(CACHE_ENV_VAR) or Path.home() / ".cache" / "kvlm" / "kernels"
    return Path(root) / f"torch{torch.__version__}-{digest.hexdigest()[:12]}"


@functools.cache
def _build() -> str | None:
    """Load the extension, compiling it first if this source version is not cached yet;
    None on success, else why it failed (in words a user can act on)."""
    build_dir = _cache_dir()
    done = build_dir / "built.ok"  # written after a build loaded: never a half-linked library
    if done.exists():  # built before: no compiler or ninja needed to load it
        torch.ops.load_library(str(build_dir / "kvlm_kernels.so"))
        _register_fakes()
        return None
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r}) on PATH"
    if shutil.which("ninja") is None:
        return "ninja is not installed (pip install ninja)"
    from torch.utils import cpp_extension

    build_dir.mkdir(parents=True, exist_ok=True)
    print(f"kvlm: compiling the C++ kernels into {build_dir} (once)", file=sys.stderr)
    try:
        cpp_extension.load(
            name="kvlm_kernels",
            sources=[str(_CSRC / name) for name in _SOURCES],
            extra_cflags=["-O3", "-fopenmp", "-std=c++17"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=False,
        )
    except Exception as e:  # a compiler error, a missing header, a linker failure
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"the C++ kernels did not build ({first_line})"
    done.touch()
    _register_fakes()
    return None


def _register_fakes() -> None:
    """Shape-only versions of the ops, so torch.compile and meta tensors can trace them."""

    @torch.library.register_fake("kvlm::quantize_act")
    def _quantize_act(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        num_rows, padded = x.shape[0], -(-x.shape[1] // 32) * 32
        return (
            x.new_empty((num_rows, padded), dtype=torch.int8),
            x.new_empty((num_rows, padded // 32), dtype=torch.float32),
            x.new_empty((num_rows, padded // 16), dtype=torch.int32),
        )

    @torch.library.register_fake("kvlm::qgemm")
    def _qgemm(qa, da, asum, w, bits, group, scale_bytes, n, isa) -> torch.Tensor:
        return qa.new_empty((qa.shape[0], n), dtype=torch.float32)

    @torch.library.register_fake("kvlm::argmax_rows")
    def _argmax_rows(logits) -> torch.Tensor:
        return logits.new_empty((logits.shape[0],), dtype=torch.int64)

    @torch.library.register_fake("kvlm::dequant_rows")
    def _dequant_rows(w, ids, bits, group, scale_bytes, k, n) -> torch.Tensor:
        return w.new_empty((*ids.shape, k), dtype=torch.float32)

    @torch.library.register_fake("kvlm::qlinear")
    def _qlinear(x, w, bits, group, scale_bytes, n, isa) -> torch.Tensor:
        return x.new_empty((x.shape[0], n), dtype=torch.float32)


def extension_loaded() -> bool:
    """Whether this process has already loaded the C++ extension (never builds it)."""
    return _build.cache_info().currsize > 0 and _build() is None


@functools.cache
def available_paths() -> tuple[str, ...]:
    """Every path this machine can run, best first ("torch" always)."""
    if _build() is not None:
        return ("torch",)
    best = int(torch.ops.kvlm.cpu_isa())
    return tuple(_ISA_NAMES[code] for code in range(best, 0, -1)) + ("torch",)


@functools.cache
def _default_status() -> KernelStatus:
    forced = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if forced not in (*PATHS, "auto"):
        raise KernelUnavailableError(
            f"{ENV_VAR}={forced!r} is not a kernel path; use one of auto, {', '.join(PATHS)}"
        )
    if forced == "torch":
        return KernelStatus("torch", f"{ENV_VAR}=torch", ("torch",))
    failure = _build()
    available = available_paths()
    if failure is not None:
        return KernelStatus("torch", failure, available)
    if forced != "auto":
        if forced not in available:
            raise KernelUnavailableError(
                f"{ENV_VAR}={forced} but this CPU runs only {', '.join(available)}; "
                f"unset {ENV_VAR} to take the best one"
            )
        return KernelStatus(forced, f"{ENV_VAR}={forced}", available)
    best = available[0]
    why = {
        "avx512": "the CPU has AVX-512 VNNI",
        "avx2": "the CPU has AVX2 but not AVX-512 VNNI",
        "ref": "the CPU lacks AVX2; scalar C++ kernels",
    }[best]
    return KernelStatus(best, why, available)


@functools.cache
def kernel_status() -> KernelStatus:
    """The default path, decided once per process; announced on stderr the first time."""
    status = _default_status()
    names = {"avx512": "avx512-vnni kernels", "avx2": "avx2 kernels", "ref": "scalar C++ kernels"}
    what = names.get(status.path, "the torch fallback (dequantize + float matmul)")
    amx = ""
    if status.path == "avx512":
        no_amx = str(torch.ops.kvlm.amx_status())
        amx = f"; no AMX tiles: {no_amx}" if no_amx else "; AMX int8 tiles for 16+ rows"
    print(f"kvlm: quantized matmuls use {what}: {status.reason}{amx}", file=sys.stderr)
    return status


def resolve_path(path: str | None) -> str:
    """`path` if given and runnable here, else the process default."""
    if path is None:
        return kernel_status().path
    if path not in PATHS:
        raise KernelUnavailableError(f"unknown kernel path {path!r}; one of {', '.join(PATHS)}")
    if path not in available_paths():
        raise KernelUnavailableError(
            f"kernel path {path!r} cannot run here; available: {', '.join(available_paths())}"
        )
    return path
