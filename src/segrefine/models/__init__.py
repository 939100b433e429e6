"""Backbones: each subclasses ``segrefine.models.base.Backbone`` (the declared contract) and
returns ``forward(image) -> BackboneOutput`` (see segrefine.types)."""
