"""Heads: turn a BackboneOutput and the input image into full-resolution logits."""
