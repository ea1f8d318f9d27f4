"""Models: the factory (hub id, local path or tiny; 4-bit/8-bit; LoRA; merge, export), the DPO
forward over pairs and its attention (``pairs``) and the tiny local Llama. Importing the package is
light; ``factory`` and ``pairs`` import torch."""
