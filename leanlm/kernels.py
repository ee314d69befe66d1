"""Optional fused C++ CPU kernels for one-token decoding (leanlm/kernels.cpp), chosen at run time with
`kernel="cpp"` (`leanlm generate/bench --kernel cpp`, `generate(..., kernel="cpp")`, `decode_layout(model, "cpp")`).

The default, "torch", is pure PyTorch. "cpp" replaces, for one token of one row in fp32 on a CPU, each block's
attention half and SwiGLU half by one op each (`attn_decode`, `mlp_decode`), LTE's sparse FFN by `lte_decode`, and
the small ops around the blocks (embedding, final norm with the lm head, SUBLLM's stage score and upsample), which
cost ~0.1 ms each mid-step as PyTorch ops (kernels.cpp); everything else (prefill, batches, training, other dtypes
and devices) runs the PyTorch code it would run anyway. The kernel is a run-time choice, not part of a model's
config: it changes how a step is computed, not what.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

from leanlm.errors import LeanLMError

KERNELS = ("torch", "cpp")


def check_kernel(kernel: str) -> None:
    if kernel not in KERNELS:
        raise LeanLMError(f"--kernel must be torch (pure PyTorch) or cpp (fused C++ CPU decode ops), got {kernel!r}")


@functools.cache
def cpp_kernels():
    """The compiled extension, built on first use for this CPU (-march=native; torch caches the build under
    ~/.cache/torch_extensions, so later processes only load it, in about a second)."""
    from torch.utils.cpp_extension import is_ninja_available, load

    if shutil.which("c++") is None:
        raise LeanLMError("--kernel cpp needs a C++ compiler (c++ not found); use --kernel torch")
    if not is_ninja_available():
        raise LeanLMError("--kernel cpp needs ninja to build (pip install ninja); or use --kernel torch")
    try:
        return load(
            name="leanlm_kernels",
            sources=[str(Path(__file__).with_name("kernels.cpp"))],
            # -fopenmp: at::parallel_for is a header template that runs serially unless compiled with OpenMP; the
            # libgomp it links is the one torch has already loaded (same soname), so the threads are torch's
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
        )
    except Exception as e:  # a compiler or linker error: the log is long, its last line names the failure
        last = (str(e).strip().splitlines() or ["unknown error"])[-1]
        raise LeanLMError(f"--kernel cpp: building the C++ kernels failed ({last})") from None
