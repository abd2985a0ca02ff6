"""cltrace stage 1: language models (`clt.lm`) and cross-layer transcoders."""

from clt.configs import ConfigError

__all__ = ["ConfigError"]
