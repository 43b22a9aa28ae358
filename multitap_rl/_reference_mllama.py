"""A re-implementation of the MULTI-TAP reference forward for a Llama-3.2-Vision (Mllama)
checkpoint (kaist-cvml/MULTI-TAP ``prepare_input`` + ``VLMRewardModel.forward`` under
transformers 4.46.1), on transformers 5:

one sample at a time; the base model's ``MllamaProcessor`` called as the reference calls it
(``padding="max_length"``, ``max_length``, ``truncation=True``; the tokenizer's own padding side
and pad token, i.e. right padding with ``<|finetune_right_pad_id|>`` for the hub tokenizer); the
*full* ``MllamaForConditionalGeneration`` with logits and the processor's attention and
cross-attention masks; ``hidden_states[-1][:, -1]``; ``sigmoid(reward_head(h))``.

One deliberate change to transformers 5: its vision tower takes ``intermediate_layers_indices``
one layer later than 4.46.1 did (it no longer counts the embeddings as hidden state 0), so the
indices are lowered by one here to compute what 4.46.1 computed (verified against 4.46.1 itself
by tests/test_mllama_reference_446.py). The backbone is loaded through transformers' own handling
of the 4.46 key layout; neither ``multitap_rl.checkpoint`` nor the scoring engine is used. Exported
as ``multitap_rl.testing.MllamaReferenceScorer``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ._reference import prepare_input_messages, stage_backbone

__all__ = ["MllamaReferenceScorer"]


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
