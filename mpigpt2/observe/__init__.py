"""Observability: FLOPs, MFU and phase metrics, Chrome traces."""
