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

A case may set ``max_length`` (evaluate.py and the stage-1 recipe use 2048) and ``pad_token``
(single_objective_train.py sets the pad token to ``eos_token`` before training).

Usage (``DIR`` holds ``base/`` and ``reward/`` from ``build_tiny_mllama_multitap``)::

    python tools/reference_446_mllama.py DIR --seed 0 --out tests/data/reference_446_mllama_scores.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_446 import case_image, fingerprint, load_make_image, versions  # noqa: E402

__all__ = ["DEFAULT_CASES", "Reference446Mllama", "main"]

logger = logging.getLogger("reference_446_mllama")

MAX_LENGTH = 1024
IMAGE_SIZE = 560
CAPTION_INSTRUCTION = "Describe this image."

DEFAULT_CASES: list[dict] = [
    {"name": "short", "image": {"seed": 0, "size": [64, 48]}, "text": "Dog."},
    {"name": "medium", "image": {"seed": 1, "size": [72, 52]},
     "text": "A red circle on the left of a small white square."},
    {"name": "long", "image": {"seed": 2, "size": [80, 56]},
     "text": "There is a bright green triangle near the top corner, and a dark blue cross at the bottom, "
             "with some grass and a tree behind the house."},
    {"name": "truncated", "image": {"seed": 3, "size": [88, 60]}, "text": "A big orange circle " * 200},
    {"name": "truncated_other_image", "image": {"seed": 4, "size": [300, 200]},
     "text": "Two small dogs are sitting next to a car on the street, " * 60},
    {"name": "unicode", "image": {"seed": 5, "size": [40, 90]},
     "text": "Café crème — naïve déjà vu: 犬が二匹います。 🐶  double  spaces\nand a new line."},
    {"name": "digits_punct", "image": {"seed": 6, "size": [800, 600]},
     "text": "Exactly 3 cats, 12 dogs & 1 car!!! (at 10:45?) ..."},
    {"name": "same_image_other_text", "image": {"seed": 0, "size": [64, 48]},
     "text": "A tiny black square in the center."},
    {"name": "instruction_colour", "image": {"seed": 1, "size": [72, 52]},
     "question": "What colour is the shape?", "text": "It is red."},
    {"name": "instruction_where", "image": {"seed": 2, "size": [80, 56]},
     "question": "Where is the circle?", "text": "On the left side of the picture, near the top."},
    {"name": "instruction_count", "image": {"seed": 7, "size": [56, 56]},
     "question": "How many objects are there?", "text": "Two."},
    {"name": "instruction_truncated", "image": {"seed": 8, "size": [64, 64]},
     "question": "Describe everything you see in detail.", "text": "There is a big blue circle. " * 150},
    # evaluate.py's layout and max_length (2048): the pad read at position 2047 instead of 1023.
    {"name": "evaluate_layout_2048", "image": {"seed": 9, "size": [96, 64]}, "max_length": 2048,
     "question": "Describe this image.", "text": "A red circle on the left of a small white square."},
    {"name": "medium_2048", "image": {"seed": 1, "size": [72, 52]}, "max_length": 2048,
     "text": "A red circle on the left of a small white square."},
    {"name": "long_untruncated_2048", "image": {"seed": 3, "size": [88, 60]}, "max_length": 2048,
     "text": "A big orange circle " * 200},
    # single_objective_train.py: pad token = eos (<|eot_id|>), the recipe's max_length 2048.
    {"name": "stage1_training_pad_eos_2048", "image": {"seed": 1, "size": [72, 52]}, "max_length": 2048,
     "pad_token": "<|eot_id|>", "text": "A red circle on the left of a small white square."},
    # a short max_length: truncation, and a padded tail of a few tokens only
    {"name": "max_length_48_truncated", "image": {"seed": 2, "size": [80, 56]}, "max_length": 48,
     "text": "There is a bright green triangle near the top corner, and a dark blue cross at the bottom."},
    {"name": "max_length_40_padded", "image": {"seed": 0, "size": [64, 48]}, "max_length": 40, "text": "Dog."},
]


class Reference446Mllama:
    """The MULTI-TAP forward for an Mllama checkpoint under transformers 4.46.1, float32, CPU."""

    def __init__(self, model_dir: str | Path):
        import torch
        from safetensors.torch import load_file
        from transformers import AutoProcessor, MllamaForConditionalGeneration

        root = Path(model_dir)
        base, reward = root / "base", root / "reward"
        # 1. Processor (MllamaImageProcessor + PreTrainedTokenizerFast in 4.46.1).
        self.processor = AutoProcessor.from_pretrained(base)
        if not self.processor.chat_template:
            raise ValueError(f"{base}: the processor has no chat template")
        self.default_pad = self.processor.tokenizer.pad_token
        # 2. Base model, then the checkpoint's backbone over it (every key).
        self.model = MllamaForConditionalGeneration.from_pretrained(base, torch_dtype=torch.float32).eval()
        index = json.loads((reward / "model.safetensors.index.json").read_text())
        state = {}
        for shard in sorted(set(index["weight_map"].values())):
            state.update(load_file(str(reward / shard)))
        prefix = "backbone_model."
        backbone = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        result = self.model.load_state_dict(backbone, strict=False)
        if result.unexpected_keys or result.missing_keys:
            raise ValueError(f"checkpoint does not fit the 4.46 layout: missing {result.missing_keys}, "
                             f"unexpected {result.unexpected_keys}")
        # 3. Reward head (VLMRewardModel: hidden size 4096 fallback = text hidden size for 11B; here
        #    the text hidden size, read from the head's weight).
        self.head = torch.nn.Linear(state["reward_head.weight"].shape[1], 1)
        self.head.load_state_dict({"weight": state["reward_head.weight"], "bias": state["reward_head.bias"]})
        self.head.eval()
        self.attn_implementation = self.model.config._attn_implementation

    @staticmethod
    def messages(text: str, question: str | None) -> list[dict]:
        if question is None:
            return [
                {"role": "user", "content": [{"type": "text", "text": CAPTION_INSTRUCTION}]},
                {"role": "assistant", "content": [{"type": "image"}, {"type": "text", "text": text}]},
            ]
        return [{"role": "assistant", "content": [{"type": "text", "text": question}, {"type": "image"},
                                                  {"type": "text", "text": text}]}]

    def inputs(self, image, text: str, question: str | None = None, max_length: int | None = MAX_LENGTH,
               pad_token: str | None = None) -> dict:
        tok = self.processor.tokenizer
        tok.pad_token = pad_token or self.default_pad
        prompt = self.processor.apply_chat_template(self.messages(text, question), tokenize=False)
        image = image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE))
        kwargs = {"padding": "max_length", "max_length": max_length, "truncation": True} if max_length else {}
        return self.processor(text=prompt, images=image, return_tensors="pt", **kwargs)

    def run(self, image, text: str, question: str | None = None, max_length: int = MAX_LENGTH,
            pad_token: str | None = None) -> dict:
        import torch

        inputs = self.inputs(image, text, question, max_length, pad_token)
        if inputs["input_ids"].shape[1] != max_length:
            raise ValueError(f"the processor returned {inputs['input_ids'].shape[1]} tokens, not {max_length}")
        untruncated = self.inputs(image, text, question, None, pad_token)["input_ids"].shape[1]
        with torch.no_grad():
            out = self.model(**inputs, return_dict=True, output_hidden_states=True)
            last = out.hidden_states[-1] + 0.0 * torch.mean(out.logits)
            h = last[:, -1, :].type_as(self.head.weight)
            logit = self.head(h).squeeze(-1)
            overall = torch.sigmoid(logit)
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
            "hidden_norm": float(h[0].norm()),
            "hidden": [float(v) for v in h[0]],
        }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", help="directory holding base/ and reward/ (build_tiny_mllama_multitap)")
    p.add_argument("--seed", type=int, default=0, help="the seed DIR was built with (recorded in the output)")
    p.add_argument("--builder-versions", help="JSON file with the versions of the environment that built DIR")
    p.add_argument("--cases", help="JSON list of cases like DEFAULT_CASES (default: the built-in list)")
    p.add_argument("--out", help="write the JSON here (default: print it)")
    p.add_argument("--allow-other-version", action="store_true",
                   help="run under a transformers other than 4.46.1 (for experiments only)")
    args = p.parse_args(argv)

    import torch
    import transformers

    torch.set_num_threads(1)
    if transformers.__version__ != "4.46.1" and not args.allow_other_version:
        p.error(f"this is transformers {transformers.__version__}; run it in the 4.46.1 virtualenv "
                "(tools/README.md) or pass --allow-other-version")
    model_dir = Path(args.model_dir)
    for sub in ("base", "reward"):
        if not (model_dir / sub).is_dir():
            p.error(f"{model_dir}: no {sub}/ directory")
    cases = json.loads(Path(args.cases).read_text()) if args.cases else DEFAULT_CASES

    make_image = load_make_image()
    ref = Reference446Mllama(model_dir)
    results = []
    for i, case in enumerate(cases):
        max_length = int(case.get("max_length", MAX_LENGTH))
        row = ref.run(case_image(case, make_image), case["text"], case.get("question"), max_length,
                      case.get("pad_token"))
        results.append({**case, "question": case.get("question"), "max_length": max_length,
                        "pad_token": case.get("pad_token"), **row})
        logger.info("case %d %-30s overall=%.8f |h|=%.6f tokens=%d/%d last=%d", i, case.get("name", ""),
                    row["overall"], row["hidden_norm"], row["kept_tokens"], row["prompt_tokens"],
                    row["last_token_id"])

    doc = {
        "generator": "tools/reference_446_mllama.py (transformers 4.46.1 reference forward; see tools/README.md)",
        "versions": versions(),
        "model": {"built_with": f"multitap_rl.testing.build_tiny_mllama_multitap(DIR, seed={args.seed})",
                  "seed": args.seed, "family": "mllama", "fingerprint": fingerprint(model_dir),
                  "builder_versions": json.loads(Path(args.builder_versions).read_text())
                  if args.builder_versions else None},
        "settings": {"max_length": f"{MAX_LENGTH} unless a case says otherwise", "truncation": True,
                     "padding": "max_length (the tokenizer's side: right)",
                     "pad_token": f"{ref.default_pad} unless a case says otherwise",
                     "image_size": IMAGE_SIZE, "dtype": "float32", "device": "cpu",
                     "attn_implementation": ref.attn_implementation,
                     "position_ids": "4.46.1 plain forward(): arange over the padded length",
                     "read_at": "hidden_states[-1][:, -1] of the padded sequence"},
        "cases": results,
    }
    text = json.dumps(doc, indent=1, ensure_ascii=False) + "\n"
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        logger.info("wrote %s (%d cases)", args.out, len(results))
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main())
