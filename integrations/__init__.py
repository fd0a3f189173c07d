"""Adapters for host frameworks, shipped as ``memsurgery.integrations``.

This folder lives at the top of the repository and is mapped into the installed package by
pyproject.toml (``[tool.setuptools.package-dir]``), so ``import memsurgery.integrations`` works
from a wheel as well as from an editable install. Framework adapters (Lightning, HF Trainer)
import their framework lazily.
"""
