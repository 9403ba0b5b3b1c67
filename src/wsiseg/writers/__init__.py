"""Stitching, blending and output writers."""
