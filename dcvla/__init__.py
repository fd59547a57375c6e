"""dcvla: a workbench for studying cross-frame caching in OpenVLA-style vision-language-action models."""

__version__ = "0.1.0"
