"""VARGPT: a unified multimodal model that understands images (LLaVA style) and generates them (VAR style)."""

__version__ = "0.1.0"
