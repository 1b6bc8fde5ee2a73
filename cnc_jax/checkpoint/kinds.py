"""The kinds of converted folders (config.json "kind") and the config class of each: one table, so the store reads
any kind without knowing where its weights come from.

  cnc                          CnCConfig (SD 1.5, fusers; every preset and stage)
  clip_vision, u2net, dpt      the annotators (cnc_jax.checkpoint.annotator_weights reads their official files)
  fid_inception, lpips, clip   the evaluation networks (cnc_jax.checkpoint.eval_net_weights)
"""

from __future__ import annotations

from cnc_jax.model_config import CnCConfig, ConfigError
from cnc_jax.models import clip_model, clip_vision, dpt, inception, lpips, u2net

ANNOTATOR_KINDS = ("clip_vision", "u2net", "dpt")
EVAL_KINDS = ("fid_inception", "lpips", "clip")
CONFIG_CLASSES = {"cnc": CnCConfig,
                  "clip_vision": clip_vision.CLIPVisionConfig, "u2net": u2net.U2NetConfig, "dpt": dpt.DPTConfig,
                  "fid_inception": inception.InceptionConfig, "lpips": lpips.LPIPSConfig, "clip": clip_model.CLIPConfig}


def config_from_dict(kind: str, d: dict, source: str = ""):
    """The config of a converted folder of `kind` from its config.json "model" entry (ConfigError if it does not fit)."""
    cls = CONFIG_CLASSES.get(kind)
    if cls is None:
        raise ConfigError(f"unknown kind {kind!r} (one of {', '.join(CONFIG_CLASSES)})")
    if cls is CnCConfig:
        return CnCConfig.from_dict(d, source=source)
    if hasattr(cls, "from_dict"):
        return cls.from_dict(d)
    try:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"not a {cls.__name__} ({e})") from None
