"""dcvla: a workbench for studying cross-frame caching in vision-language-action models (OpenVLA and OpenVLA-OFT,
pi0 and pi0.5, SmolVLA): one engine, model families beside it, studies that run in process, as shards or on Ray."""

__version__ = "0.1.0"
