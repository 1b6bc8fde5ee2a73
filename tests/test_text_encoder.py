"""CLIP text transformer against transformers' CLIPTextModel outputs (text_encoder.npz)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnc_jax.checkpoint import load_official_params
from cnc_jax.model_config import config_from_official_yaml, load_text_config
from cnc_jax.models.clip_text import CLIPTextTransformer, pooled_output
from tests.conftest import check_parity, rel_err
from tests.test_vae import CHECKPOINTS, TOL


@pytest.fixture(scope="module")
def text_config(ref_dir):
    return load_text_config(str(ref_dir / "tiny_clip_text_config.json"))


@pytest.fixture(scope="module")
def encoder(text_config):
    model = CLIPTextTransformer(text_config)
    return model, jax.jit(lambda p, ids: model.apply({"params": p}, ids))


@pytest.fixture(scope="module", params=CHECKPOINTS)
def text_params(request, ref_dir):
    config = config_from_official_yaml(str(ref_dir / "tiny_cnc_config.yaml"))
    params = load_official_params(ref_dir / request.param, config, ["text_encoder"], skip_other_parts=True)
    return request.param, params["text_encoder"]


def test_yaml_picks_up_text_config(ref_dir, text_config):
    assert config_from_official_yaml(str(ref_dir / "tiny_cnc_config.yaml")).text_encoder == text_config


def test_text_encoder_parity(text_params, encoder, ref):
    source, params = text_params
    r = ref("text_encoder")
    out = encoder[1](params, r["input_ids"])
    check_parity(f"text_encoder[{source}]", "last_hidden_state", out, r["last_hidden_state"])


def test_causal_prefix_and_pooling(text_params, encoder, ref, text_config):
    """Causality: a prefix of the tokens gives the prefix of the output. Pooling reads the first EOS."""
    _, params = text_params
    r = ref("text_encoder")
    ids, want = r["input_ids"], r["last_hidden_state"]
    assert rel_err(encoder[1](params, ids[:, :9]), want[:, :9]) <= TOL
    first_eos = np.argmax(ids == text_config.eos_token_id, axis=-1)
    np.testing.assert_array_equal(pooled_output(jnp.asarray(want), ids, text_config.eos_token_id),
                                  want[np.arange(len(ids)), first_eos])
