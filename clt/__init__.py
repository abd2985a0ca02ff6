"""cltrace stage 1: language models (`clt.lm`) and cross-layer transcoders.

- `clt.transcoder`: CLT / PLT definition, activation functions, save/load.
- `clt.circuit_tracer_io`: the circuit-tracer safetensors layout (export, import, hub repos).
- `clt.data`: text -> token contexts -> shuffled activation batches.
- `clt.train`: loss, optimizer, sharded train step, checkpoints, the training loop
  (`clt.train_config`: its config; `clt.train_run`: interrupts, progress, TensorBoard).
- `clt.sparse`: the sparse training step.
- `clt.splice`: the transcoder spliced into the model (evaluation, replacement, interventions).
- `clt.evaluate`: NMSE, L0, dead/dense features, spliced-model KL / top-1 / delta CE.
"""

from clt.configs import ConfigError
from clt.transcoder import TranscoderConfig, TranscoderParams

__all__ = ["ConfigError", "TranscoderConfig", "TranscoderParams"]
