"""Score a tiny MULTI-TAP model with the real transformers 4.46.1, the reference's version.

Runs in a throwaway virtualenv with transformers 4.46.1 (see tools/README.md), *not* in the
project's environment. It computes what the MULTI-TAP reference (kaist-cvml/MULTI-TAP:
``prepare_input`` + ``VLMRewardModel.forward``) computes, through 4.46.1's public API only:

1. the base model's ``Qwen2VLProcessor`` (image processor + tokenizer) and chat template;
2. ``Qwen2VLForConditionalGeneration.from_pretrained(base)`` with the checkpoint's
   ``backbone_model.*`` weights loaded over it (4.46 key layout, tied ``lm_head`` absent);
3. per sample, one at a time: caption task = user "Describe this image." + assistant
   [image, caption]; instruction task = one assistant turn [question, image, response]; the
   image converted to RGB and resized to 560x560 (PIL default filter); the processor called with
   ``padding="max_length", max_length=1024, truncation=True`` (left padding);
4. a plain ``forward(**inputs, output_hidden_states=True)`` (4.46.1: arange position ids over
   the padded length, no M-RoPE), ``h = hidden_states[-1][:, -1]``, ``sigmoid(reward_head(h))``.

``--dtype`` (default ``float32``, the stored numbers): ``bfloat16`` loads the whole model with
``torch_dtype=torch.bfloat16`` and runs the reward head in bfloat16 too, as ``VLMRewardModel`` in a
bf16 model does; each case then also records ``logit_float32_head``/``overall_float32_head``, the
same bf16 hidden state through a float32 copy of the head.

Usage (``DIR`` written by ``multitap-rl tiny DIR --seed 0`` in the project's environment)::

    python tools/reference_446.py DIR --seed 0 --out tests/data/reference_446_scores.json

Images are generated with ``multitap_rl.testing.make_image`` (read from this checkout by file
path, without importing the package), so the output names each image by seed and size only.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import logging
import platform
import sys
from pathlib import Path

__all__ = ["COMMON_CASES", "DEFAULT_CASES", "DTYPES", "Reference446", "fingerprint", "load_make_image", "main"]

logger = logging.getLogger("reference_446")

REPO = Path(__file__).resolve().parents[1]
MAX_LENGTH = 1024
IMAGE_SIZE = 560
CAPTION_INSTRUCTION = "Describe this image."
DTYPES = ("float32", "bfloat16")  # --dtype: names of torch dtypes the model (and reward head) load in

# Inputs (shared with reference_446_mllama.py): mixed-length captions (one past 1024 tokens, one
# landing near the cut), the instruction task, several generated images of different sizes,
# non-ASCII text and odd whitespace.
COMMON_CASES: list[dict] = [
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
    # evaluate.py's layout (one assistant turn ["Describe this image.", image, caption]) and its
    # max_length of 2048, also the stage-1 recipe's: = our instruction task with that question.
    {"name": "evaluate_layout_2048", "image": {"seed": 9, "size": [96, 64]}, "max_length": 2048,
     "question": "Describe this image.", "text": "A red circle on the left of a small white square."},
]
LONG_UNTRUNCATED_2048 = {"name": "long_untruncated_2048", "image": {"seed": 3, "size": [88, 60]},
                         "max_length": 2048, "text": "A big orange circle " * 200}
DEFAULT_CASES: list[dict] = [*COMMON_CASES, LONG_UNTRUNCATED_2048]


# -- helpers usable from any environment (stdlib only) --------------------------------------------
def fingerprint(model_dir: str | Path) -> dict:
    """sha256 of every file under ``model_dir`` (``base/`` and ``reward/``), and one over them all.

    Returns ``{"sha256": hex, "files": {relative posix path: hex}}``; the total hashes the sorted
    ``path\\0digest\\n`` lines, so a renamed or added file changes it too."""
    root = Path(model_dir)
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        files[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    if not files:
        raise ValueError(f"{root}: no files to fingerprint")
    total = hashlib.sha256("".join(f"{k}\0{v}\n" for k, v in sorted(files.items())).encode()).hexdigest()
    return {"sha256": total, "files": files}


def load_make_image(repo: Path = REPO):
    """``multitap_rl.testing.make_image`` from this checkout, without importing the package (it
    needs transformers 5): the function's source is taken out of ``testing/images.py`` and run
    alone with the module's absolute imports. tests/test_reference_446.py checks it draws the same
    pixels as the package's own ``make_image``."""
    path = repo / "multitap_rl" / "testing" / "images.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    keep = [node for node in tree.body
            if (isinstance(node, ast.Import)
                or (isinstance(node, ast.ImportFrom) and not node.level and node.module != "__future__")
                or (isinstance(node, ast.FunctionDef) and node.name == "make_image"))]
    if not any(isinstance(node, ast.FunctionDef) for node in keep):
        raise ValueError(f"{path}: no top-level make_image()")
    namespace: dict = {"__name__": "_multitap_testing_make_image"}
    exec(compile(ast.Module(body=keep, type_ignores=[]), str(path), "exec"), namespace)
    return namespace["make_image"]


def case_image(case: dict, make_image):
    spec = case["image"]
    return make_image(int(spec["seed"]), size=tuple(int(v) for v in spec["size"]))


def messages(text: str, question: str | None) -> list[dict]:
    """The reference's chat messages: caption task = user "Describe this image." + assistant
    [image, caption]; instruction task = one assistant turn [question, image, response]."""
    if question is None:
        return [
            {"role": "user", "content": [{"type": "text", "text": CAPTION_INSTRUCTION}]},
            {"role": "assistant", "content": [{"type": "image"}, {"type": "text", "text": text}]},
        ]
    return [{"role": "assistant", "content": [{"type": "text", "text": question}, {"type": "image"},
                                              {"type": "text", "text": text}]}]


def read_reward_checkpoint(reward: Path) -> tuple[dict, dict]:
    """(every tensor, the ``backbone_model.*`` ones without that prefix) of a sharded checkpoint."""
    from safetensors.torch import load_file

    index = json.loads((reward / "model.safetensors.index.json").read_text())
    state = {}
    for shard in sorted(set(index["weight_map"].values())):
        state.update(load_file(str(reward / shard)))
    prefix = "backbone_model."
    return state, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def torch_dtype(name: str):
    """``torch.float32``/``torch.bfloat16`` for a ``--dtype`` name (one of ``DTYPES``)."""
    import torch

    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {name!r}")
    return getattr(torch, name)


def reward_head(state: dict, hidden: int, dtype: str = "float32"):
    """VLMRewardModel's ``reward_head`` (Linear(hidden, 1)) with the checkpoint's weights, in
    ``dtype`` (the model's: in a bf16 model the head is bf16 too)."""
    import torch

    head = torch.nn.Linear(hidden, 1)
    head.load_state_dict({"weight": state["reward_head.weight"], "bias": state["reward_head.bias"]})
    return head.to(torch_dtype(dtype)).eval()


def head_float32_row(state: dict, head, h) -> dict:
    """For a model not in float32: the logit and score of its hidden state ``h`` through a float32
    copy of the head (separates the head's rounding from the backbone's); ``{}`` in float32."""
    import torch

    if head.weight.dtype == torch.float32:
        return {}
    head32 = reward_head(state, head.in_features)
    with torch.no_grad():
        logit = head32(h.float()).squeeze(-1)
    return {"logit_float32_head": float(logit[0]), "overall_float32_head": float(torch.sigmoid(logit)[0])}


def processor_inputs(processor, image, text: str, question: str | None, max_length: int | None) -> dict:
    """``prepare_input``: the chat template as text, the image in RGB resized to 560x560 (PIL's
    default filter), the processor padding to and truncating at ``max_length`` (None: neither)."""
    prompt = processor.apply_chat_template(messages(text, question), tokenize=False)
    image = image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE))
    kwargs = {"padding": "max_length", "max_length": max_length, "truncation": True} if max_length else {}
    return processor(text=prompt, images=image, return_tensors="pt", **kwargs)


def reference_forward(model, head, inputs) -> tuple:
    """VLMRewardModel.forward: full model with logits, ``hidden_states[-1][:, -1]``, sigmoid head.
    Returns (overall, logit, h)."""
    import torch

    with torch.no_grad():
        out = model(**inputs, return_dict=True, output_hidden_states=True)
        last = out.hidden_states[-1] + 0.0 * torch.mean(out.logits)
        h = last[:, -1, :].type_as(head.weight)
        logit = head(h).squeeze(-1)
        return torch.sigmoid(logit), logit, h


def parse_args(argv, description: str, model_help: str, build_hint: str, extra=None):
    """The command line both scripts share; refuses a transformers other than 4.46.1 and a
    ``model_dir`` without ``base/`` and ``reward/``."""
    p = argparse.ArgumentParser(description=description.split("\n\n")[0])
    p.add_argument("model_dir", help=model_help)
    p.add_argument("--seed", type=int, default=0, help="the seed DIR was built with (recorded in the output)")
    p.add_argument("--builder-versions", help="JSON file with the versions of the environment that built DIR "
                   "(recorded in the output, shown when the fingerprint no longer matches)")
    p.add_argument("--cases", help="JSON list of cases like DEFAULT_CASES (default: the built-in list)")
    p.add_argument("--out", help="write the JSON here (default: print it)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="load the model and its reward head in this dtype (default: float32, the stored numbers)")
    p.add_argument("--allow-other-version", action="store_true",
                   help="run under a transformers other than 4.46.1 (for experiments only)")
    if extra:
        extra(p)
    args = p.parse_args(argv)

    import torch
    import transformers

    torch.set_num_threads(1)
    if transformers.__version__ != "4.46.1" and not args.allow_other_version:
        p.error(f"this is transformers {transformers.__version__}; run it in the 4.46.1 virtualenv "
                "(tools/README.md) or pass --allow-other-version")
    args.model_dir = Path(args.model_dir)
    for sub in ("base", "reward"):
        if not (args.model_dir / sub).is_dir():
            p.error(f"{args.model_dir}: no {sub}/ directory; {build_hint}")
    args.cases = json.loads(Path(args.cases).read_text()) if args.cases else None
    return args


def score_cases(run, cases: list[dict], extra_keys: tuple[str, ...] = ()) -> list[dict]:
    """``run(image, case, max_length) -> row`` over the cases; each result is the case, its
    question, max_length and ``extra_keys`` (None when absent), then the row."""
    make_image = load_make_image()
    results = []
    for i, case in enumerate(cases):
        max_length = int(case.get("max_length", MAX_LENGTH))
        row = run(case_image(case, make_image), case, max_length)
        results.append({**case, "question": case.get("question"), "max_length": max_length,
                        **{k: case.get(k) for k in extra_keys}, **row})
        logger.info("case %d %-30s overall=%.8f |h|=%.6f tokens=%d/%d last=%d", i, case.get("name", ""),
                    row["overall"], row["hidden_norm"], row["kept_tokens"], row["prompt_tokens"],
                    row["last_token_id"])
    return results


def write_output(doc: dict, out: str | None) -> int:
    text = json.dumps(doc, indent=1, ensure_ascii=False) + "\n"
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
        logger.info("wrote %s (%d cases)", out, len(doc["cases"]))
    else:
        sys.stdout.write(text)
    return 0


# -- the reference computation (transformers 4.46.1) ----------------------------------------------
class Reference446:
    """The MULTI-TAP forward for a Qwen2-VL checkpoint under transformers 4.46.1 on CPU, in
    ``dtype`` (``DTYPES``; the reward head too)."""

    def __init__(self, model_dir: str | Path, dtype: str = "float32"):
        from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

        root = Path(model_dir)
        base, reward = root / "base", root / "reward"
        # 1. Processor (Qwen2VLProcessor = Qwen2VLImageProcessor + Qwen2TokenizerFast in 4.46.1).
        self.processor = AutoProcessor.from_pretrained(base)
        tok = self.processor.tokenizer
        if tok.padding_side != "left":
            raise ValueError(f"{base}: tokenizer pads on the {tok.padding_side}; the hub Qwen2-VL pads left")
        if not self.processor.chat_template:
            raise ValueError(f"{base}: the processor has no chat template")
        # 2. Base model, then the checkpoint's backbone over it (every weight but the tied lm_head).
        self.model = Qwen2VLForConditionalGeneration.from_pretrained(base, torch_dtype=torch_dtype(dtype)).eval()
        state, backbone = read_reward_checkpoint(reward)
        result = self.model.load_state_dict(backbone, strict=False)
        if result.unexpected_keys or set(result.missing_keys) != {"lm_head.weight"}:
            raise ValueError(f"checkpoint does not fit the 4.46 layout: missing {result.missing_keys}, "
                             f"unexpected {result.unexpected_keys}")
        if self.model.lm_head.weight.data_ptr() != self.model.model.embed_tokens.weight.data_ptr():
            raise ValueError("lm_head is not tied to embed_tokens; the checkpoint omits lm_head.weight")
        # 3. Reward head (in the model's dtype).
        self.state = state
        self.head = reward_head(state, self.model.config.hidden_size, dtype)
        self.attn_implementation = self.model.config._attn_implementation

    def inputs(self, image, text: str, question: str | None = None, max_length: int | None = MAX_LENGTH) -> dict:
        """The processor's output, padded (left) and truncated to ``max_length`` (None: neither)."""
        return processor_inputs(self.processor, image, text, question, max_length)

    def run(self, image, text: str, question: str | None = None, max_length: int = MAX_LENGTH) -> dict:
        """One sample: overall score, reward-head logit, last hidden state and token counts."""
        inputs = self.inputs(image, text, question, max_length)
        if inputs["input_ids"].shape[1] != max_length:
            raise ValueError(f"the processor returned {inputs['input_ids'].shape[1]} tokens, not {max_length}")
        untruncated = self.inputs(image, text, question, None)["input_ids"].shape[1]
        overall, logit, h = reference_forward(self.model, self.head, inputs)
        mask = inputs["attention_mask"][0]
        return {
            "prompt_tokens": int(untruncated),
            "kept_tokens": int(mask.sum()),
            "truncated": bool(untruncated > max_length),
            "last_token_id": int(inputs["input_ids"][0, -1]),
            "image_grid_thw": [int(v) for v in inputs["image_grid_thw"][0]],
            "overall": float(overall[0]),
            "logit": float(logit[0]),
            **head_float32_row(self.state, self.head, h),
            "hidden_norm": float(h[0].float().norm()),
            "hidden": [float(v) for v in h[0]],
        }


def versions() -> dict:
    import numpy
    import PIL
    import tokenizers
    import torch
    import transformers

    return {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
            "torch": torch.__version__, "pillow": PIL.__version__, "numpy": numpy.__version__,
            "python": platform.python_version()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(
        argv, __doc__, "directory written by `multitap-rl tiny DIR` (holds base/ and reward/)",
        "build it with `multitap-rl tiny DIR`",
        extra=lambda p: p.add_argument("--size", default="tiny", help="the --size DIR was built with (recorded)"),
    )
    ref = Reference446(args.model_dir, args.dtype)
    results = score_cases(lambda image, case, max_length: ref.run(image, case["text"], case.get("question"),
                                                                  max_length),
                          args.cases or DEFAULT_CASES)
    doc = {
        "generator": "tools/reference_446.py (transformers 4.46.1 reference forward; see tools/README.md)",
        "versions": versions(),
        "model": {"built_with": f"multitap-rl tiny DIR --seed {args.seed} --size {args.size}",
                  "seed": args.seed, "size": args.size, "fingerprint": fingerprint(args.model_dir),
                  "builder_versions": json.loads(Path(args.builder_versions).read_text())
                  if args.builder_versions else None},
        "settings": {"max_length": f"{MAX_LENGTH} unless a case says otherwise", "truncation": True,
                     "padding": "max_length (left)",
                     "image_size": IMAGE_SIZE, "dtype": args.dtype, "device": "cpu",
                     "attn_implementation": ref.attn_implementation,
                     "position_ids": "4.46.1 plain forward(): arange over the padded length"},
        "cases": results,
    }
    return write_output(doc, args.out)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main())
