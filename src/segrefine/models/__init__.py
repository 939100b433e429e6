"""Backbones: each ``forward(image) -> BackboneOutput`` (see segrefine.types)."""
