"""Test helper shared by the fast-path tests: a tiny policy whose adapter looks trained."""

from __future__ import annotations

import torch

from raydpo.models.factory import load_model


def trained_looking_policy(cfg, path, *, seed: int = 0, scale: float = 0.05):
    """``cfg``'s model from ``path`` with its LoRA B weights drawn at random (``seed``, times
    ``scale``), so the policy differs from its reference; the same weights on every call, in eval mode."""
    torch.manual_seed(0)  # lora_A's init draws from the global generator: not from whatever ran before
    model = load_model(cfg.model, cfg.quantization, cfg.lora, base_path=path)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()
