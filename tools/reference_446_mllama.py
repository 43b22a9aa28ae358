"""Score a tiny Llama-3.2-Vision (Mllama) MULTI-TAP model with the real transformers 4.46.1.

The Mllama twin of tools/reference_446.py: runs in the transformers-4.46.1 virtualenv (see
tools/README.md), not in the project's environment, and computes what the MULTI-TAP reference
(kaist-cvml/MULTI-TAP: ``prepare_input`` + ``VLMRewardModel.forward``) computes for a "llama"
backbone, through 4.46.1's public API only:

1. the base model's ``MllamaProcessor`` (``MllamaImageProcessor`` + the tokenizer, which pads on
   the right with ``<|finetune_right_pad_id|>`` and whose post-processor prepends
   ``<|begin_of_text|>``) and its chat template;
2. ``MllamaForConditionalGeneration.from_pretrained(base)`` with the checkpoint's
   ``backbone_model.*`` weights loaded over it (4.46 key layout; every key, ``lm_head`` included);
3. per sample, one at a time: the same messages as for Qwen2-VL; ``apply_chat_template(...,
   tokenize=False)``; the image converted to RGB and resized to 560x560; the processor called
   with ``padding="max_length", max_length=1024, truncation=True``;
4. a plain ``forward(**inputs, output_hidden_states=True)``; ``h = hidden_states[-1][:, -1]``
   (+ ``0 * mean(logits)``), ``sigmoid(reward_head(h))``.

``--dtype float32|bfloat16`` as in tools/reference_446.py (default float32; in bfloat16 the model
and its reward head load in bf16, and each case also records the float32-head logit and score).

A case may set ``max_length`` (evaluate.py and the stage-1 recipe use 2048) and ``pad_token``
(single_objective_train.py sets the pad token to ``eos_token`` before training).

Usage (``DIR`` holds ``base/`` and ``reward/`` from ``build_tiny_mllama_multitap``)::

    python tools/reference_446_mllama.py DIR --seed 0 --out tests/data/reference_446_mllama_scores.json
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_446 import (  # noqa: E402
    COMMON_CASES,
    IMAGE_SIZE,
    LONG_UNTRUNCATED_2048,
    MAX_LENGTH,
    fingerprint,
    head_float32_row,
    parse_args,
    processor_inputs,
    read_reward_checkpoint,
    reference_forward,
    reward_head,
    score_cases,
    torch_dtype,
    versions,
    write_output,
)

__all__ = ["DEFAULT_CASES", "Reference446Mllama", "main"]


# The Qwen2-VL cases (evaluate.py's layout at 2048 included), then what right padding makes differ.
DEFAULT_CASES: list[dict] = [
    *COMMON_CASES,
    # the pad read at position 2047 instead of 1023
    {"name": "medium_2048", "image": {"seed": 1, "size": [72, 52]}, "max_length": 2048,
     "text": "A red circle on the left of a small white square."},
    LONG_UNTRUNCATED_2048,
    # single_objective_train.py: pad token = eos (<|eot_id|>), the recipe's max_length 2048.
    {"name": "stage1_training_pad_eos_2048", "image": {"seed": 1, "size": [72, 52]}, "max_length": 2048,
     "pad_token": "<|eot_id|>", "text": "A red circle on the left of a small white square."},
    # a short max_length: truncation, and a padded tail of a few tokens only
    {"name": "max_length_48_truncated", "image": {"seed": 2, "size": [80, 56]}, "max_length": 48,
     "text": "There is a bright green triangle near the top corner, and a dark blue cross at the bottom."},
    {"name": "max_length_40_padded", "image": {"seed": 0, "size": [64, 48]}, "max_length": 40, "text": "Dog."},
]


class Reference446Mllama:
    """The MULTI-TAP forward for an Mllama checkpoint under transformers 4.46.1 on CPU, in ``dtype``
    (``float32`` or ``bfloat16``; the reward head too)."""

    def __init__(self, model_dir: str | Path, dtype: str = "float32"):
        from transformers import AutoProcessor, MllamaForConditionalGeneration

        root = Path(model_dir)
        base, reward = root / "base", root / "reward"
        # 1. Processor (MllamaImageProcessor + PreTrainedTokenizerFast in 4.46.1).
        self.processor = AutoProcessor.from_pretrained(base)
        if not self.processor.chat_template:
            raise ValueError(f"{base}: the processor has no chat template")
        self.default_pad = self.processor.tokenizer.pad_token
        # 2. Base model, then the checkpoint's backbone over it (every key).
        self.model = MllamaForConditionalGeneration.from_pretrained(base, torch_dtype=torch_dtype(dtype)).eval()
        state, backbone = read_reward_checkpoint(reward)
        result = self.model.load_state_dict(backbone, strict=False)
        if result.unexpected_keys or result.missing_keys:
            raise ValueError(f"checkpoint does not fit the 4.46 layout: missing {result.missing_keys}, "
                             f"unexpected {result.unexpected_keys}")
        # 3. Reward head (VLMRewardModel: hidden size 4096 fallback = text hidden size for 11B; here
        #    the text hidden size, read from the head's weight).
        self.state = state
        self.head = reward_head(state, state["reward_head.weight"].shape[1], dtype)
        self.attn_implementation = self.model.config._attn_implementation

    def inputs(self, image, text: str, question: str | None = None, max_length: int | None = MAX_LENGTH,
               pad_token: str | None = None) -> dict:
        tok = self.processor.tokenizer
        tok.pad_token = pad_token or self.default_pad
        return processor_inputs(self.processor, image, text, question, max_length)

    def run(self, image, text: str, question: str | None = None, max_length: int = MAX_LENGTH,
            pad_token: str | None = None) -> dict:
        import torch

        inputs = self.inputs(image, text, question, max_length, pad_token)
        if inputs["input_ids"].shape[1] != max_length:
            raise ValueError(f"the processor returned {inputs['input_ids'].shape[1]} tokens, not {max_length}")
        untruncated = self.inputs(image, text, question, None, pad_token)["input_ids"].shape[1]
        overall, logit, h = reference_forward(self.model, self.head, inputs)
        ids = inputs["input_ids"][0]
        mask = inputs["attention_mask"][0]
        bos = self.processor.tokenizer.bos_token_id
        return {
            "prompt_tokens": int(untruncated),
            "kept_tokens": int(mask.sum()),
            "truncated": bool(untruncated > max_length),
            "padding_side": self.processor.tokenizer.padding_side,
            "pad_token_id": int(self.processor.tokenizer.pad_token_id),
            "last_token_id": int(ids[-1]),
            "leading_bos": int((torch.cumprod((ids == bos).int(), 0)).sum()),
            "image_token_index": int((ids == self.model.config.image_token_index).nonzero()[0, 0]),
            "num_tiles": int(inputs["aspect_ratio_mask"][0, 0].sum()),
            "overall": float(overall[0]),
            "logit": float(logit[0]),
            **head_float32_row(self.state, self.head, h),
            "hidden_norm": float(h[0].float().norm()),
            "hidden": [float(v) for v in h[0]],
        }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv, __doc__, "directory holding base/ and reward/ (build_tiny_mllama_multitap)",
                      "build it with multitap_rl.testing.build_tiny_mllama_multitap")
    ref = Reference446Mllama(args.model_dir, args.dtype)
    results = score_cases(lambda image, case, max_length: ref.run(image, case["text"], case.get("question"),
                                                                  max_length, case.get("pad_token")),
                          args.cases or DEFAULT_CASES, extra_keys=("pad_token",))
    doc = {
        "generator": "tools/reference_446_mllama.py (transformers 4.46.1 reference forward; see tools/README.md)",
        "versions": versions(),
        "model": {"built_with": f"multitap_rl.testing.build_tiny_mllama_multitap(DIR, seed={args.seed})",
                  "seed": args.seed, "family": "mllama", "fingerprint": fingerprint(args.model_dir),
                  "builder_versions": json.loads(Path(args.builder_versions).read_text())
                  if args.builder_versions else None},
        "settings": {"max_length": f"{MAX_LENGTH} unless a case says otherwise", "truncation": True,
                     "padding": "max_length (the tokenizer's side: right)",
                     "pad_token": f"{ref.default_pad} unless a case says otherwise",
                     "image_size": IMAGE_SIZE, "dtype": args.dtype, "device": "cpu",
                     "attn_implementation": ref.attn_implementation,
                     "position_ids": "4.46.1 plain forward(): arange over the padded length",
                     "read_at": "hidden_states[-1][:, -1] of the padded sequence"},
        "cases": results,
    }
    return write_output(doc, args.out)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main())
