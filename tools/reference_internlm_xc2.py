"""Score a tiny InternLM-XComposer2.5 MULTI-TAP model with XComposer2.5's own remote code.

Runs in a throwaway virtualenv with transformers 4.33.2 (the version the remote code's config
names; see tools/README.md), *not* in the project's environment, and computes what the MULTI-TAP
reference computes for an "internlm" backbone:

* ``multi_objective_train.py`` ``prepare_input`` (stage-2 features / scoring): caption task
  ``{"text_input": "Describe this image. <ImageHere>;" + text, "text_input": "<ImageHere>;" + text,
  "image": ...}`` -- written out below as the same dict literal, so Python decides which key wins --
  instruction task ``question + "<ImageHere>;" + response``; the image
  ``to_tensor(image.convert("RGB").resize((560, 560))).unsqueeze(0).unsqueeze(0).bfloat16()``
  (torchvision's ``to_tensor``);
* ``VLMRewardModel.forward``: ``inputs, _, _ = backbone.interleav_wrap_chat(query=..., image=...)``,
  ``backbone(**inputs, return_dict=True, output_hidden_states=True)``,
  ``h = (hidden_states[-1] + 0 * mean(logits))[:, -1]``, ``sigmoid(reward_head(h))``.

Two more settings of the remote code itself, for the adapter's options: ``plora="image"`` passes
``interleav_wrap_chat``'s image mask to the forward (XComposer2.5's own chat), and ``hd`` cases
hand ``interleav_wrap_chat`` an image *file* (``encode_img``: ``Image_transform(hd_num=24)`` +
``vis_processor``), whose crop count depends on size and aspect ratio.

The remote code (``--remote-code DIR``: ``modeling_internlm_xcomposer2.py``,
``modeling_internlm2.py``, ``configuration_internlm_xcomposer2.py``, ``build_mlp.py``,
``ixc_utils.py``, ``tokenization_internlm2.py`` of internlm/internlm-xcomposer2d5-7b) is copied
next to the tiny base model's config and loaded with ``trust_remote_code=True``, with these
patches, each checked to apply:

1. ``build_mlp.build_vision_tower``: the CLIP it loads by name -> the tiny ``DIR/clip``;
2. the hard-coded widths 4096 (projector input / hidden, separator embeddings) -> the tiny sizes
   (256 = 4 x the tiny CLIP width, 64 = the tiny LLM width);
3. ``self.font = get_font()`` (downloads a font at construction; used only for videos) -> None;
   ``ixc_utils`` imports ``decord`` (videos only): a stub module stands in;
4. the OmniLive copy's extra ``video_mem_proj`` (not in internlm-xcomposer2d5-7b) is removed.

PyPI's torchvision wheels are CUDA builds: with the CPU torch their C extension does not load and
``import torchvision`` stops while registering fake kernels for ``torchvision::nms``/``qnms``. The
script declares those two op schemas first; only torchvision's pure-Python transforms run.

Usage (``DIR`` from ``multitap_rl.testing.build_tiny_internlm_xc2_multitap``)::

    python tools/reference_internlm_xc2.py DIR --remote-code CODE --out tests/data/reference_internlm_xc2_scores.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import shutil
import sys
import tempfile
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_446 import (  # noqa: E402  (stdlib-only helpers shared with the 4.46.1 tools)
    case_image,
    fingerprint,
    load_make_image,
    read_reward_checkpoint,
    reward_head,
    versions,
    write_output,
)

__all__ = ["DEFAULT_CASES", "ReferenceXC2", "main"]

logger = logging.getLogger("reference_internlm_xc2")
TRANSFORMERS_VERSION = "4.33.2"
REMOTE_FILES = ("modeling_internlm_xcomposer2.py", "modeling_internlm2.py", "configuration_internlm_xcomposer2.py",
                "build_mlp.py", "ixc_utils.py", "tokenization_internlm2.py")

DEFAULT_CASES: list[dict] = [
    {"name": "short", "image": {"seed": 0, "size": [64, 48]}, "text": "Dog."},
    {"name": "medium", "image": {"seed": 1, "size": [72, 52]},
     "text": "A red circle on the left of a small white square."},
    {"name": "long", "image": {"seed": 2, "size": [80, 56]},
     "text": "There is a bright green triangle near the top corner, and a dark blue cross at the bottom, "
             "with some grass and a tree behind the house."},
    # longer than 1024 positions with the image: the reference does not cut it (max_length 16384)
    {"name": "long_untruncated", "image": {"seed": 3, "size": [88, 60]}, "text": "A big orange circle " * 60},
    {"name": "unicode", "image": {"seed": 5, "size": [40, 90]},
     "text": "Café crème — naïve déjà vu: 犬が二匹います。 🐶  double  spaces\nand a new line."},
    {"name": "digits_punct", "image": {"seed": 6, "size": [800, 600]},
     "text": "Exactly 3 cats, 12 dogs & 1 car!!! (at 10:45?) ..."},
    {"name": "special_tokens_in_text", "image": {"seed": 4, "size": [300, 200]},
     "text": "A cat </s> and a dog <s>  on a mat [UNUSED_TOKEN_145] ."},
    {"name": "same_image_other_text", "image": {"seed": 0, "size": [64, 48]},
     "text": "A tiny black square in the center."},
    {"name": "instruction_colour", "image": {"seed": 1, "size": [72, 52]},
     "question": "What colour is the shape?", "text": "It is red."},
    {"name": "instruction_where", "image": {"seed": 2, "size": [80, 56]},
     "question": "Where is the circle?", "text": "On the left side of the picture, near the top."},
    {"name": "instruction_count", "image": {"seed": 7, "size": [56, 56]},
     "question": "How many objects are there?", "text": "Two."},
    # XComposer2.5's own chat: P-LoRA on the image tokens
    {"name": "plora_image_caption", "plora": "image", "image": {"seed": 1, "size": [72, 52]},
     "text": "A red circle on the left of a small white square."},
    {"name": "plora_image_instruction", "plora": "image", "image": {"seed": 7, "size": [56, 56]},
     "question": "How many objects are there?", "text": "Two."},
    # XComposer2.5's HD transform of an image file: the crop grid varies with size and aspect ratio
    {"name": "hd_small_1x1", "hd": True, "image": {"seed": 0, "size": [64, 48]}, "text": "Dog."},
    {"name": "hd_portrait_2x1", "hd": True, "image": {"seed": 8, "size": [300, 900]},
     "text": "A tall picture of a tree."},
    {"name": "hd_4_3_2x2", "hd": True, "image": {"seed": 6, "size": [800, 600]},
     "text": "Exactly 3 cats, 12 dogs & 1 car."},
    {"name": "hd_wide_2x3", "hd": True, "image": {"seed": 9, "size": [1200, 500]},
     "question": "What is on the left?", "text": "A red circle."},
]


def _import_torchvision():
    """torchvision's Python transforms with a CPU torch (see the module docstring)."""
    import torch

    if "torchvision" not in sys.modules:
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _import_torchvision.lib = lib  # keep the definitions alive
    import torchvision  # noqa: F401

    return torchvision


def _patch(text: str, pattern: str, repl: str, what: str, count: int | None = 1, optional: bool = False) -> str:
    new, n = re.subn(pattern, repl, text)
    if (count is not None and n != count and not (optional and n == 0)) or (count is None and n == 0):
        raise ValueError(f"remote code patch {what!r} applied {n} times (expected {count or '>= 1'})")
    return new


def stage_remote_code(code: Path, base: Path, clip: Path, workdir: Path, vision_width: int, hidden: int) -> dict:
    """Copy the base model and the (patched) remote code into ``workdir``; return the sha256 of the
    remote files as found."""
    shutil.copytree(base, workdir, dirs_exist_ok=True)
    digests = {}
    for name in REMOTE_FILES:
        text = (code / name).read_text()
        digests[name] = hashlib.sha256(text.encode()).hexdigest()
        if name == "build_mlp.py":
            text = _patch(text, r"(def build_vision_tower\([^)]*\):\n\s+vision_tower = )'[^']*'",
                          lambda m: m.group(1) + repr(str(clip)), "vision tower path", optional=True)
            text = _patch(text, r"def build_vision_tower\(vision_tower='[^']*'\)",
                          f"def build_vision_tower(vision_tower={str(clip)!r})", "vision tower default", optional=True)
            if repr(str(clip)) not in text:
                raise ValueError("remote code patch 'vision tower path' did not apply")
            text = _patch(text, r"def build_vision_projector\(input_dim=4096\)",
                          f"def build_vision_projector(input_dim={vision_width})", "projector input default",
                          optional=True)
            text = _patch(text, r"mm_hidden_size = 4096", f"mm_hidden_size = {vision_width}", "projector input",
                          optional=True)
            text = _patch(text, r"mid_hidden_size = 4096", f"mid_hidden_size = {hidden}", "projector middle")
            text = _patch(text, r"\n(\s+)hidden_size = 4096", rf"\n\g<1>hidden_size = {hidden}", "projector output")
        elif name == "modeling_internlm_xcomposer2.py":
            text = _patch(text, r"torch\.zeros\(\[1, 1, 4096\]\)", f"torch.zeros([1, 1, {vision_width}])", "glb_GN")
            text = _patch(text, r"torch\.zeros\(\[1, 1, 1, 4096\]\)", f"torch.zeros([1, 1, 1, {vision_width}])",
                          "sub_GN")
            text = _patch(text, r"self\.font = get_font\(\)", "self.font = None", "font download")
            text = _patch(text, r"\n\s+self\.video_mem_proj = build_vision_projector\(\d+\)", "", "OmniLive video_mem_proj",
                          optional=True)
        (workdir / name).write_text(text)
    return digests


class ReferenceXC2:
    """The MULTI-TAP forward through XComposer2.5's remote code, float32, CPU."""

    def __init__(self, model_dir: Path, code: Path, workdir: Path):
        import torch

        _import_torchvision()
        sys.modules.setdefault("decord", types.SimpleNamespace(VideoReader=None))  # ixc_utils imports it (videos)
        from transformers import AutoModelForCausalLM, AutoProcessor

        base, reward, clip = model_dir / "base", model_dir / "reward", model_dir / "clip"
        cfg = json.loads((base / "config.json").read_text())
        vision_width = 4 * json.loads((clip / "config.json").read_text())["hidden_size"]
        self.remote_sha256 = stage_remote_code(code, base, clip, workdir, vision_width, cfg["hidden_size"])
        # 1. The model as MULTI-TAP builds it (AutoModelForCausalLM, trust_remote_code), then the
        #    checkpoint's backbone over it: every key must fit (load_model_with_index loads non-strictly).
        self.model = AutoModelForCausalLM.from_pretrained(workdir, trust_remote_code=True,
                                                          torch_dtype=torch.float32).eval()
        state, backbone = read_reward_checkpoint(reward)
        result = self.model.load_state_dict(backbone, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(f"checkpoint does not fit the remote model: missing {result.missing_keys[:5]}, "
                             f"unexpected {result.unexpected_keys[:5]}")
        # multi_objective_train.py: model.backbone_model.tokenizer = AutoProcessor.from_pretrained(...)
        self.tokenizer = AutoProcessor.from_pretrained(workdir, trust_remote_code=True)
        self.model.tokenizer = self.tokenizer
        self.head = reward_head(state, cfg["hidden_size"])
        self.attn_implementation = cfg.get("attn_implementation")
        self._record: dict = {}
        self._hooks()

    def _hooks(self):
        """Record what the reference computes on the way: the ids of each tokenized part, the
        image embeddings' length and the vision grid, the P-LoRA mask the backbone sees, the dtype
        of the CLIP features."""
        model, rec = self.model, self._record
        tok_call = type(self.tokenizer).__call__

        def tokenizer_call(tok, text, *args, **kwargs):
            out = tok_call(tok, text, *args, **kwargs)
            rec.setdefault("parts", []).append([int(i) for i in out["input_ids"][0]])
            return out

        type(self.tokenizer).__call__ = tokenizer_call
        encode_img = model.encode_img

        def encode(image, hd_num=25):
            out = encode_img(image, hd_num)
            rec["image_tokens"] = int(out.shape[1])
            rec["hd_num"] = hd_num
            return out

        model.encode_img = encode
        vit_forward = model.vit.forward

        def vit(images, glb_gn, sub_gn):
            img = images[0]
            rec["pixels"] = {"dtype": str(img.dtype).replace("torch.", ""), "shape": list(img.shape),
                             "sum": float(img.double().sum())}
            out, lens = vit_forward(images, glb_gn, sub_gn)
            feats = out[0, :20]  # the global view's first row of merged CLIP features (no separator)
            rec["clip_features_bfloat16_exact"] = bool((feats.bfloat16().float() == feats.float()).all())
            rec["view_tokens_sum"] = float(out.double().sum())  # before the projector: features + separators
            h, w = img.shape[-2] // 560, img.shape[-1] // 560
            rec["crops"] = [h, w]
            return out, lens

        model.vit.forward = vit
        wqkv = model.model.layers[0].attention.wqkv

        def plora_hook(module, args, kwargs):
            mask = args[1] if len(args) > 1 else kwargs.get("im_mask")
            rec["plora_rows"] = None if mask is None else int(mask.sum())

        wqkv.register_forward_pre_hook(plora_hook, with_kwargs=True)

    def samples(self, image, text, question, hd: bool, tmp: Path) -> dict:
        """``prepare_input`` of multi_objective_train.py (internlm branch); an image file for ``hd``."""
        from torchvision.transforms.functional import to_tensor as totensor

        if hd:
            path = tmp / "image.png"
            image.convert("RGB").save(path)
            pixels = [str(path)]
        else:
            pixels = totensor(image.convert("RGB").resize((560, 560))).unsqueeze(0).unsqueeze(0).bfloat16()
        if question is not None:
            return {"samples": {"text_input": question + "<ImageHere>;" + text, "image": pixels}}
        return {"samples": {"text_input": "Describe this image. <ImageHere>;" + text,  # noqa: F601 (as the reference)
                            "text_input": "<ImageHere>;" + text,  # noqa: F601
                            "image": pixels}}

    def run(self, image, case: dict, tmp: Path) -> dict:
        import torch

        self._record.clear()
        samples = self.samples(image, case["text"], case.get("question"), bool(case.get("hd")), tmp)["samples"]
        with torch.no_grad():
            img = samples["image"] if isinstance(samples["image"], list) else samples["image"].bfloat16()
            inputs, im_mask, temp_len = self.model.interleav_wrap_chat(query=samples["text_input"], image=img)
            inputs = {k: v for k, v in inputs.items() if torch.is_tensor(v)}
            if case.get("plora") == "image":
                inputs["im_mask"] = im_mask  # XComposer2.5's chat; MULTI-TAP drops the mask
            out = self.model(**inputs, return_dict=True, output_hidden_states=True)
            last = out.hidden_states[-1] + 0.0 * torch.mean(out.logits)
            h = last[:, -1, :].type_as(self.head.weight)
            logit = self.head(h).squeeze(-1)
            overall = torch.sigmoid(logit)
        rec = self._record
        parts = rec.get("parts", [])
        ids = parts[0] + [-1] * rec["image_tokens"] + [i for p in parts[1:] for i in p]
        return {
            "query": samples["text_input"],
            "positions": int(inputs["inputs_embeds"].shape[1]),
            "ids": ids,
            "image_tokens": rec["image_tokens"],
            "image_mask_tokens": int(im_mask.sum()),
            "plora_rows_seen": rec.get("plora_rows"),
            "crops": rec["crops"],
            "hd_num": rec["hd_num"],
            "pixels": rec["pixels"],
            "clip_features_bfloat16_exact": rec["clip_features_bfloat16_exact"],
            "view_tokens_sum": rec["view_tokens_sum"],
            "last_token_id": ids[-1],
            "overall": float(overall[0]),
            "logit": float(logit[0]),
            "hidden_norm": float(h[0].norm()),
            "hidden": [float(v) for v in h[0]],
        }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", help="directory holding base/, clip/ and reward/ (build_tiny_internlm_xc2_multitap)")
    p.add_argument("--remote-code", required=True, help="directory with the remote code files of "
                   "internlm/internlm-xcomposer2d5-7b (" + ", ".join(REMOTE_FILES) + ")")
    p.add_argument("--remote-code-source", default=None, help="where the remote code came from (recorded)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--builder-versions", help="JSON file with the versions of the environment that built DIR")
    p.add_argument("--cases", help="JSON list of cases like DEFAULT_CASES")
    p.add_argument("--out", help="write the JSON here (default: print it)")
    p.add_argument("--allow-other-version", action="store_true")
    args = p.parse_args(argv)

    import torch
    import transformers

    torch.set_num_threads(1)
    if transformers.__version__ != TRANSFORMERS_VERSION and not args.allow_other_version:
        p.error(f"this is transformers {transformers.__version__}; run it in the {TRANSFORMERS_VERSION} virtualenv")
    root = Path(args.model_dir)
    for sub in ("base", "reward", "clip"):
        if not (root / sub).is_dir():
            p.error(f"{root}: no {sub}/; build it with multitap_rl.testing.build_tiny_internlm_xc2_multitap")
    cases = json.loads(Path(args.cases).read_text()) if args.cases else DEFAULT_CASES
    make_image = load_make_image()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ref = ReferenceXC2(root, Path(args.remote_code), tmp / "model")
        results = []
        for case in cases:
            row = ref.run(case_image(case, make_image), case, tmp)
            results.append({**case, "question": case.get("question"), "plora": case.get("plora", "reference"),
                            "hd": bool(case.get("hd")), **row})
            logger.info("%-28s overall=%.8f positions=%d crops=%s plora_rows=%s", case["name"], row["overall"],
                        row["positions"], row["crops"], row["plora_rows_seen"])
        doc = {
            "generator": "tools/reference_internlm_xc2.py (XComposer2.5 remote code under transformers "
                         f"{TRANSFORMERS_VERSION}; see tools/README.md)",
            "versions": versions(),
            "remote_code": {"source": args.remote_code_source, "sha256": ref.remote_sha256},
            "model": {"built_with": f"build_tiny_internlm_xc2_multitap(DIR, seed={args.seed})", "seed": args.seed,
                      "fingerprint": fingerprint(root),
                      "builder_versions": json.loads(Path(args.builder_versions).read_text())
                      if args.builder_versions else None},
            "settings": {"dtype": "float32", "device": "cpu", "attn_implementation": ref.attn_implementation,
                         "forward": "VLMRewardModel.forward: interleav_wrap_chat -> inputs_embeds only",
                         "read_at": "hidden_states[-1][:, -1]"},
            "cases": results,
        }
    return write_output(doc, args.out)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main())
