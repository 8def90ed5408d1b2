"""Evaluation of generated images: a pixel-only judge of `synthetic_shapes` captions."""
