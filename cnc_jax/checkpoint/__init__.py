"""Torch-free, code-execution-free readers of PyTorch (.ckpt/.pth/.pt/.bin) and safetensors checkpoints.

Why it exists: the JAX port must load the official weights without torch and without letting a
checkpoint's pickle run code. The public entry point is `cnc_jax.torchfile.state_dict.load_state_dict`.
"""
