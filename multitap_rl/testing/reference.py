"""Re-implementations of the MULTI-TAP reference forward (kaist-cvml/MULTI-TAP, ``prepare_input``
+ ``VLMRewardModel.forward`` under transformers 4.46.1) on transformers 5, one per backbone.

They use neither ``multitap_rl.checkpoint`` nor the scoring engine: each loads the backbone through
transformers' own handling of the 4.46 key layout, runs one sample at a time with the reference's
padding and the *full* model with logits, and reads ``hidden_states[-1][:, -1]`` ->
``sigmoid(reward_head(h))``. Tests compare the engine against them; ``benchmarks/`` use them as
the baseline.

* :class:`ReferenceScorer` (Qwen2-VL): prompt padded (left) to max_length 1024 with truncation;
  arange position ids on all three axes (what 4.46.1's plain forward used).
* :class:`MllamaReferenceScorer` (Llama-3.2-Vision): the base model's ``MllamaProcessor`` called
  as the reference calls it (``padding="max_length"``, ``max_length``, ``truncation=True``; the
  tokenizer's own padding side and pad token, i.e. right padding with
  ``<|finetune_right_pad_id|>`` for the hub tokenizer), the processor's attention and
  cross-attention masks. One deliberate change to transformers 5: its vision tower takes
  ``intermediate_layers_indices`` one layer later than 4.46.1 did (it no longer counts the
  embeddings as hidden state 0), so the indices are lowered by one here to compute what 4.46.1
  computed (verified against 4.46.1 itself by tests/test_mllama_reference_446.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

__all__ = ["MAX_LENGTH", "MllamaReferenceScorer", "ReferenceScorer", "prepare_input_messages", "stage_backbone"]


def prepare_input_messages(text: str, question: str | None = None) -> list[dict]:
    """The chat messages of the reference's ``prepare_input`` (multi_objective_train.py), written
    out here independently of the library's backbones: caption task = user "Describe this
    image." + assistant [image, text]; instruction task = one assistant turn [question, image, text]."""
    if question is not None:
        return [{"role": "assistant", "content": [{"type": "text", "text": question},
                                                  {"type": "image"}, {"type": "text", "text": text}]}]
    return [{"role": "user", "content": [{"type": "text", "text": "Describe this image."}]},
            {"role": "assistant", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def stage_backbone(base_dir: Path, reward_dir: Path, workdir: Path) -> dict[str, torch.Tensor]:
    """Write the released checkpoint's ``backbone_model.*`` weights (4.46 key names) next to the
    base model's config in ``workdir``, for transformers' own ``from_pretrained`` to load; return
    the checkpoint's full state (for the reward head)."""
    base_dir, reward_dir, workdir = Path(base_dir), Path(reward_dir), Path(workdir)
    index = json.loads((reward_dir / "model.safetensors.index.json").read_text())
    state = {}
    for shard in sorted(set(index["weight_map"].values())):
        state.update(load_file(str(reward_dir / shard)))
    backbone = {k[len("backbone_model."):]: v for k, v in state.items() if k.startswith("backbone_model.")}
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copy(base_dir / "config.json", workdir / "config.json")
    save_file(backbone, str(workdir / "model.safetensors"), metadata={"format": "pt"})
    return state

MAX_LENGTH = 1024


class ReferenceScorer:
    def __init__(self, base_dir: Path, reward_dir: Path, workdir: Path):
        from transformers import AutoImageProcessor, AutoTokenizer, Qwen2VLForConditionalGeneration

        base_dir, workdir = Path(base_dir), Path(workdir)
        state = stage_backbone(base_dir, reward_dir, workdir)
        self.model = Qwen2VLForConditionalGeneration.from_pretrained(workdir, dtype=torch.float32).eval()
        self.head = torch.nn.Linear(self.model.config.text_config.hidden_size, 1)
        self.head.load_state_dict({"weight": state["reward_head.weight"], "bias": state["reward_head.bias"]})
        self.tokenizer = AutoTokenizer.from_pretrained(base_dir)
        self.image_processor = AutoImageProcessor.from_pretrained(base_dir)

    def inputs(self, image, text, question=None):
        messages = prepare_input_messages(text, question)
        prompt = self.tokenizer.apply_chat_template(messages, tokenize=False)
        image = image.convert("RGB").resize((560, 560))
        pix = self.image_processor(images=image, return_tensors="pt")
        n_tokens = int(pix["image_grid_thw"].prod()) // 4  # what Qwen2VLProcessor inserts
        prompt = prompt.replace("<|image_pad|>", "<|image_pad|>" * n_tokens)
        enc = self.tokenizer(prompt, return_tensors="pt", padding="max_length", max_length=MAX_LENGTH,
                             truncation=True)
        assert self.tokenizer.padding_side == "left"
        return {**enc, **pix}

    @torch.no_grad()
    def hidden(self, image, text, question=None) -> torch.Tensor:
        inputs = self.inputs(image, text, question)
        length = inputs["input_ids"].shape[1]
        pos = torch.arange(length).view(1, 1, -1).expand(3, 1, -1)
        out = self.model(**inputs, position_ids=pos, output_hidden_states=True, return_dict=True)
        last = out.hidden_states[-1] + 0.0 * torch.mean(out.logits)
        return last[:, -1, :]

    @torch.no_grad()
    def score(self, image, text, question=None) -> float:
        return float(torch.sigmoid(self.head(self.hidden(image, text, question))).squeeze())


class MllamaReferenceScorer:
    def __init__(self, base_dir: Path, reward_dir: Path, workdir: Path, *, max_length: int = 1024,
                 pad_token: str | None = None, padding_side: str | None = None, image_size: int | None = 560):
        from transformers import AutoProcessor, MllamaForConditionalGeneration

        base_dir, workdir = Path(base_dir), Path(workdir)
        state = stage_backbone(base_dir, reward_dir, workdir)
        model, info = MllamaForConditionalGeneration.from_pretrained(workdir, dtype=torch.float32,
                                                                      output_loading_info=True)
        bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        if bad:
            raise ValueError(f"the 4.46-layout checkpoint did not load cleanly: {bad}")
        self.model = model.eval()
        vision = self.model.model.vision_model
        vision.intermediate_layers_indices = [k - 1 for k in vision.config.intermediate_layers_indices]  # 4.46.1's
        self.head = torch.nn.Linear(self.model.config.text_config.hidden_size, 1)
        self.head.load_state_dict({"weight": state["reward_head.weight"], "bias": state["reward_head.bias"]})
        self.processor = AutoProcessor.from_pretrained(base_dir)
        tok = self.processor.tokenizer
        if pad_token is not None:
            tok.pad_token = pad_token
        if padding_side is not None:
            tok.padding_side = padding_side
        self.max_length = max_length
        self.image_size = image_size  # the reference: 560 (None: no resize, for tests of other tile layouts)

    def inputs(self, image, text, question=None):
        messages = prepare_input_messages(text, question)
        prompt = self.processor.apply_chat_template(messages, tokenize=False)
        image = image.convert("RGB")
        if self.image_size is not None:
            image = image.resize((self.image_size, self.image_size))
        return self.processor(text=prompt, images=image, return_tensors="pt", padding="max_length",
                              max_length=self.max_length, truncation=True)

    @torch.no_grad()
    def hidden(self, image, text, question=None) -> torch.Tensor:
        inputs = self.inputs(image, text, question)
        out = self.model(**inputs, output_hidden_states=True, return_dict=True)
        last = out.hidden_states[-1] + 0.0 * torch.mean(out.logits)
        return last[:, -1, :]

    @torch.no_grad()
    def score(self, image, text, question=None) -> float:
        return float(torch.sigmoid(self.head(self.hidden(image, text, question))).squeeze())
