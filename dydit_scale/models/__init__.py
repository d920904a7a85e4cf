"""Diffusers models: loading from local folders, tiny pipelines, and their dynamic versions."""
