"""Token ids of InternLM2's tokenizer as transformers 4.46.1 computes them (what MULTI-TAP ran).

Runs in a throwaway virtualenv with ``transformers==4.46.1 tokenizers==0.20.3 sentencepiece``, not
in the project's environment. XComposer2.5's remote ``InternLM2Tokenizer`` is a slow
``PreTrainedTokenizer`` over its ``tokenizer.model`` (SentencePiece pieces as tokens, ``<s>`` /
``</s>`` / ``<unk>`` as special tokens given by name, BOS prepended when asked): the minimal
tokenizer below has exactly those parts, so transformers 4.46.1's own ``tokenize`` (its special-token
split and its whitespace rule next to special tokens) decides the ids.

Usage (``BASE`` from ``multitap_rl.testing.build_tiny_internlm_xc2``; ``texts.json`` a list of str)::

    python tools/tokenizer_internlm2_446.py BASE texts.json --out tests/data/internlm2_tokenizer_446.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import sentencepiece as spm
import transformers
from transformers import PreTrainedTokenizer


class SentencePieceTokenizer(PreTrainedTokenizer):
    """A slow tokenizer whose tokens are the SentencePiece pieces of ``tokenizer.model``."""

    def __init__(self, model_file: str, **kwargs):
        self.sp = spm.SentencePieceProcessor(model_file=model_file)
        super().__init__(**kwargs)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def get_vocab(self) -> dict:
        return {self.sp.id_to_piece(i): i for i in range(self.vocab_size)}

    def _tokenize(self, text: str) -> list[str]:
        return self.sp.encode(text, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp.id_to_piece(index)

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        return [self.sp.bos_id()] + token_ids_0 + (token_ids_1 or [])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("base", type=Path)
    p.add_argument("texts", type=Path)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    cfg = json.loads((args.base / "tokenizer_config.json").read_text())
    names = {k: cfg.get(k, d) for k, d in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"),
                                           ("pad_token", "</s>"))}
    tok = SentencePieceTokenizer(str(args.base / "tokenizer.model"), **names)
    texts = json.loads(args.texts.read_text())
    cases = [{"text": t, "ids": tok(t, add_special_tokens=False)["input_ids"],
              "ids_bos": tok(t, add_special_tokens=True)["input_ids"]} for t in texts]
    args.out.write_text(json.dumps({"transformers": transformers.__version__, "cases": cases}, indent=0) + "\n")


if __name__ == "__main__":
    main()
