"""Tokenizer: a thin wrapper over a `tokenizers.Tokenizer` plus the special ids and chat template a model needs.

Stored in a checkpoint as HF does it: `tokenizer.json` (the `tokenizers` file) and `tokenizer_config.json`
(bos/eos tokens, whether to prepend bos, chat template), so `AutoTokenizer.from_pretrained` reads the same directory.
"""

from __future__ import annotations

import json
from pathlib import Path

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from leanlm.errors import LeanLMError


class Tokenizer:
    def __init__(
        self,
        tok,
        bos_token: str | None = None,
        eos_token: str | None = None,
        chat_template: str | None = None,
        add_bos: bool = False,
        pad_token: str | None = None,
    ):
        self.tok = tok  # tokenizers.Tokenizer
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.chat_template = chat_template
        self.add_bos = add_bos
        self.bos_id = self._id(bos_token)
        self.eos_id = self._id(eos_token)

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.tok.token_to_id(token)

    # -- io -----------------------------------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load from a directory with tokenizer.json (+ optional tokenizer_config.json) or a tokenizer.json file."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise LeanLMError(f"{path}: no tokenizer.json")
        try:
            tok = HFTokenizer.from_file(str(file))
        except Exception as e:  # the tokenizers library raises a bare Exception on malformed files
            raise LeanLMError(f"{file}: not a valid tokenizer.json ({str(e).splitlines()[0][:120]})") from None
        meta = {}
        cfg_file = file.parent / "tokenizer_config.json"
        if cfg_file.is_file():
            try:
                meta = json.loads(cfg_file.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise LeanLMError(f"{cfg_file}: not valid JSON ({e})") from None

        def tok_str(v):  # HF stores special tokens either as strings or as AddedToken dicts
            return v.get("content") if isinstance(v, dict) else v

        return cls(
            tok,
            bos_token=tok_str(meta.get("bos_token")),
            eos_token=tok_str(meta.get("eos_token")),
            chat_template=meta.get("chat_template"),
            add_bos=bool(meta.get("add_bos_token", False)),
            pad_token=tok_str(meta.get("pad_token")),
        )

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.tok.save(str(directory / "tokenizer.json"))
        meta = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "add_bos_token": self.add_bos,
            "model_max_length": 1_000_000_000,
        }
        if self.chat_template:
            meta["chat_template"] = self.chat_template
        (directory / "tokenizer_config.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")

    # -- use ----------------------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    def stop_ids(self) -> list[int]:
        """Token ids that end a generation: eos, plus the chat end-of-turn token when the vocabulary has one."""
        ids = {self.eos_id} if self.eos_id is not None else set()
        for t in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "</s>"):
            i = self.tok.token_to_id(t)
            if i is not None:
                ids.add(i)
        return sorted(ids)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render chat messages with the tokenizer's Jinja template (as HF does); error if there is none."""
        if not self.chat_template:
            raise LeanLMError("this tokenizer has no chat template; pass a plain prompt instead")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(msg):
            raise LeanLMError(f"chat template: {msg}")

        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )
