"""Run llama.cpp's convert_hf_to_gguf.py with one change: a BPE pre-tokenizer it does not
recognise is written as "gpt-2" (our synthetic checkpoints' byte-level BPE) instead of
aborting. Usage: python _convert_entry.py LLAMA_CPP_DIR [convert_hf_to_gguf.py arguments]."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

PRE_TOKENIZER = "gpt-2"


def main() -> None:
    llama_dir = Path(sys.argv[1]).resolve()
    sys.path[:0] = [str(llama_dir / "gguf-py"), str(llama_dir)]
    from conversion import base  # noqa: PLC0415  (the converter's package, from llama_dir)

    original = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            print(f"jaxmoe: pre-tokenizer not recognised; written as {PRE_TOKENIZER!r}", file=sys.stderr)
            return PRE_TOKENIZER

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    sys.argv = [str(llama_dir / "convert_hf_to_gguf.py"), *sys.argv[2:]]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
