"""Torch-free, code-execution-free readers of PyTorch (.ckpt/.pth/.pt/.bin) and safetensors files, and a torch.save
writer: the ground floor every weight loader stands on (numpy only; nothing here knows a model).

Why it exists: the JAX port must load the official weights without torch and without letting a checkpoint's
pickle run code, and export files the official code loads. Entry points: `state_dict.load_state_dict` (read)
and `torch_save.save_torch` (write).
"""
