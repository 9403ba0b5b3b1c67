"""Slide access, tissue detection, tile geometry, datasets and datamodules."""
