"""Shared pieces of the stage configs (ml_collections, big_vision style: configs are Python).

Every field can be overridden on the command line: `python train.py --config configs/cnc_v1.py
--config.batch_size=64 --config.mesh.fsdp=8`.
"""

import ml_collections

from cnc_jax.sharding import rules_text


def stage_config(model: str) -> ml_collections.ConfigDict:
    """The official training recipe of one stage (README "Train"; the official src/train/train.py) for the model
    preset `model`."""
    c = ml_collections.ConfigDict()
    c.model = model  # preset name, official model YAML, or a converted checkpoint folder / config.json
    c.init_checkpoint = ""  # converted folder to start from (convert_torch_weights.py init-local/-global/integrate)
    c.random_init = False  # start from fresh weights instead (smoke tests)
    c.tokenizer = ""  # folder of openai/clip-vit-large-patch14's tokenizer; "byte_level" for the tiny preset

    c.data = ml_collections.ConfigDict()
    c.data.sources = ""  # official file trees, comma separated "BASE_DIR:SPLIT" (MergedDataset order)
    c.data.tfds_dir = ""  # or a TFDS ArrayRecord build (cnc_triplets) in this data_dir
    c.data.tfds_split = "train"
    c.data.resolution = 512
    c.data.num_workers = 0
    c.data.cached = False  # batches carry cached VAE posterior moments and text embeddings (TFDS build)
    # give up (one error line) after this many unreadable records in a row: a few bad files in a row are normal in
    # web-scale data, a thousand is a broken or unmounted source (found within seconds, not an endless loop)
    c.data.max_consecutive_skips = 1000

    # official recipe: AdamW with torch defaults, lr 1e-5, 4 images per GPU, frozen SD (sd_locked)
    c.learning_rate = 1e-5
    c.warmup_steps = 0
    c.lr_schedule = "constant"  # after the warmup: constant | cosine | linear (both decay to 0 at the last step)
    c.grad_clip_norm = 0.0  # > 0: clip the gradients to this global norm (0 = off, as the official trainer)
    c.adam_b1, c.adam_b2, c.adam_eps, c.weight_decay = 0.9, 0.999, 1e-8, 0.01
    c.batch_size = -1  # global batch; -1 = 4 per device
    c.num_steps = 100_000
    c.num_epochs = 0.0  # > 0: train this many passes over the data instead (num_steps is then ignored)
    c.seed = 0
    c.sd_locked = True
    # per-sample condition dropout (in the data pipeline, as the official dataset; the mask is never dropped)
    c.drop_caption_prob = 0.1
    c.drop_condition_prob = 0.1

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    # logical axis -> mesh axes ("name=data+fsdp", "name=" replicated); entries replace the default table's
    c.mesh.rules = rules_text()
    c.remat = True  # the official trainer uses gradient checkpointing
    c.compute_dtype = "float32"  # or "bfloat16" (parameters stay float32)
    c.attention = "auto"  # self-attention: xla | dot_product | chunked | splash | auto (chunked on CPU,
    #                       dot_product (cuDNN flash where supported, else XLA) on GPU, splash on TPU)
    c.distributed = False  # call jax.distributed.initialize() (multi-host: one process per host)
    c.coordinator_address = ""  # host:port of process 0; "" = auto-detect (Cloud TPU, SLURM, ...)
    c.num_processes = -1  # -1 = auto-detect
    c.process_id = -1  # -1 = auto-detect
    c.compile_cache_dir = ""  # JAX's persistent compilation cache (local or gs://): a restart skips compiling

    c.log_every = 50
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3  # >= 1
    c.resume_from_step = -1  # -1: the newest intact checkpoint; N: resume from checkpoints/N
    c.image_log_every = 1000  # 0 = off
    c.image_log_steps = 50
    c.image_log_sampler = "ddim"  # any of cnc_jax.sampling.sampler_names.SAMPLER_NAMES (the official log: DDIM)
    c.image_log_guidance = 9.0
    c.record_data_order = False  # write each step's batch uids to data_order.jsonl
    c.profile_steps = 0  # > 0: a jax.profiler trace of this many steps into workdir/profile/ (TensorBoard/XProf)
    c.profile_start = 3  # first traced step (after the compilation)
    c.wandb_project = ""  # also log to this W&B project (only when the wandb package is installed)
    return c
