"""Models: the factory (hub id, local path or tiny; 4-bit/8-bit; LoRA; merge, export) and the tiny
local Llama. Importing the package is light; ``factory`` imports torch."""
