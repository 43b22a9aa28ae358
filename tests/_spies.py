"""Test doubles that watch what the code under test asks a model for."""

from __future__ import annotations


class Counting:
    """Wraps the model; records every text it computes features for."""

    def __init__(self, model):
        self.model, self.texts = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def features(self, images, texts, questions=None):
        self.texts.extend(texts)
        return self.model.features(images, texts, questions)
