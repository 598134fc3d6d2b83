"""Thin Hydra entry points: kdad-train, kdad-eval."""
