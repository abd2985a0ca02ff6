"""Test setup: 8 simulated CPU devices (sharding tests), float32 matmuls at full precision."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax

# Reference comparisons need true float32 matmuls (TPU/GPU default to lower precision).
jax.config.update("jax_default_matmul_precision", "highest")
