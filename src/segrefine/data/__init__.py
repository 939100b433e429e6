"""Data sources. Every DataModule yields ``{"image": (B,K,H,W) float, "mask": (B,H,W) long, "id": str}``."""
