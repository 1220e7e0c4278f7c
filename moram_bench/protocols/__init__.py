"""Modality protocols: how a batch becomes a loss and how predictions become scores.

A protocol is created per method instance (``make_protocol(module)``) from the stream's
modality; it holds no parameters of its own (everything trainable belongs to the method's
adapters), so every method on a stream is trained and scored identically.
"""
from __future__ import annotations


def make_protocol(module):
    modality = module.stream.modality
    if modality == "image":
        from .clip import ClipProtocol

        return ClipProtocol(module)
    if modality == "text":
        from .text import TextProtocol

        return TextProtocol(module)
    raise ValueError(f"no protocol for modality {modality!r}")
