"""The public sampler names (no jax import: CLIs build their parsers from them, a demo its dropdown).
Their definitions (diffusers class and settings) live in cnc_jax.sampling.samplers.SAMPLERS."""

SAMPLER_NAMES = ("ddim", "ddim_trailing", "pndm", "dpmpp_2m", "dpmpp_2m_karras", "dpmpp_2m_sde", "unipc", "euler",
                 "euler_ancestral")
DEFAULT_SAMPLER = "ddim"  # the official sampler
DEFAULT_BACKGROUND_SAMPLER = "pndm"  # the scheduler of the official data/get_background.py (SD inpainting default)
ETA_SAMPLERS = ("ddim", "ddim_trailing")  # the samplers with an eta setting
