"""llama.cpp in the same process, for `leanlm bench --vs llama.cpp`: the same GGUF file, thread count, prompt tokens
and greedy decoding as the leanlm model it is compared with.

llama.cpp comes from llama-cpp-python, an optional extra built from source once (`pip install 'leanlm[llamacpp]'`,
a few minutes of compiling; never needed by the tests or CI). Its build targets the CPU it is built on (GGML_NATIVE).
"""

from __future__ import annotations

import time
from pathlib import Path

from leanlm.errors import LeanLMError


class LlamaCpp:
    """A GGUF model run by llama.cpp; `prefill` and `decode` time what leanlm.measure's definitions say."""

    def __init__(self, path: str | Path, n_ctx: int, threads: int):
        try:
            import llama_cpp
        except ImportError:
            raise LeanLMError(
                "--vs llama.cpp needs llama-cpp-python (built from source, minutes): pip install 'leanlm[llamacpp]'"
            ) from None
        self.path = Path(path)
        self.threads = threads
        self.llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False
        )
        self.system_info = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
        self.version = getattr(llama_cpp, "__version__", "unknown")
        self.vocab_size = self.llm.n_vocab()

    def prefill(self, ids: list[int]) -> tuple[int, float]:
        """One forward of the prompt into an empty cache: (tokens, seconds)."""
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(ids)
        return len(ids), time.perf_counter() - t0

    def decode(self, ids: list[int], new_tokens: int) -> tuple[int, float]:
        """Greedy generation of `new_tokens` after the prompt `ids`: (new_tokens - 1, seconds from the first new
        token to the last), leanlm.measure.DEFINITIONS["decode"] (measure.decode checks new_tokens >= 2)."""
        first = end = None
        self.llm.reset()
        steps = self.llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True)
        for i, _ in enumerate(steps):
            if i == 0:
                first = time.perf_counter()
            if i + 1 == new_tokens:
                end = time.perf_counter()
                break
        if first is None or end is None:
            raise LeanLMError(f"llama.cpp stopped before {new_tokens} new tokens")
        return new_tokens - 1, end - first
