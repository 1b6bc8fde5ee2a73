"""The official demo's prompt texts (the tokenizer and text encoder are cnc_jax.text_encoder)."""

DEFAULT_NEGATIVE_PROMPT = ("longbody, lowres, bad anatomy, bad hands, missing fingers, extra digit, fewer digits, "
                           "cropped, worst quality, low quality")  # the official demo's default
PROMPT_SUFFIX = " ,masterpiece, ultra detailed, high resolution"  # the official demo appends this
