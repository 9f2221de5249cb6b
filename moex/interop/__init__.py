"""Models in and out of moex: safetensors export, `load_pretrained`, Hugging Face import/export.

Layouts and supported families: docs/interop.md.
"""
