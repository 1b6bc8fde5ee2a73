"""Annotators: the procedures that turn user images into CnC conditions (CLIP image embeddings,
U²-Net saliency masks, DPT depth maps), on top of the JAX models in cnc_jax.models."""
