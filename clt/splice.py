"""The transcoder spliced into the model: one MLP hook for every path that runs it in place of the
MLPs (evaluation, the local replacement model, interventions and generation under them).

`SplicedTranscoder` replaces the MLP of every layer by the transcoder, run layer by layer
(`clt.transcoder.layer_step`: the features of layer l are computed from the spliced model's own
activation at the transcoder's input point, `TranscoderConfig.read`, and their writes to later
layers wait in the hook's state). Two options:

* `errors`: add each MLP's frozen error at the prompt's positions, making the spliced model exact
  on the prompt (the local replacement model, "Circuit Tracing" §2.2). The output is written as
  `mlp_out + (recon - recon_at_prompt)`: the same function as `recon + (mlp_out - recon_at_prompt)`
  but exact in floating point when nothing changed. Positions beyond the prompt (generation) take
  the model's own MLP plus what the edits change there.
* `edits`: change features' activations as they are computed (interventions in free mode). Each
  edit has `layer`, `feature` and `apply(values, positions) -> values`
  (`attribution.interventions.FeatureEdit`).

hook_params: the `TranscoderParams` alone without errors; with errors the tuple (params, MLP
outputs at the prompt [layer, 1, P, d_model], reconstructions at the prompt [layer, 1, P,
d_model], absolute positions of the sequence run [pos]).

A sparse autoencoder (`TranscoderConfig.is_sae`: it reconstructs the residual stream before the
MLP that it reads) is spliced by replacing that residual stream x with its reconstruction r: the
block then adds r - x and the model's own MLP of r (`TrueMLP.of_resid`), so everything after it
reads r. With `errors` its error x - recon(x) is kept as computed on the run itself (an SAE has
no prompt to freeze it at, and needs none: its layers are independent), so only edits change
anything: r = x + (edited recon - recon), exactly the edited features' change in activation
times their decoder rows; hook_params are then the params alone. `layers` splices only those
layers (the model's own MLP, or residual, elsewhere): for a per-layer dictionary (PLT, SAE).

Layers are the model's throughout (`layers`, the edits' `layer`, the hook's `layer`); an SAE
that covers only some (`TranscoderConfig.layers`) is spliced at those, its dictionary found by
`TranscoderConfig.layer_index`, and leaves the others alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp

from clt.configs import ConfigError
from clt.lm.model import MLPHook
from clt.transcoder import TranscoderConfig, init_pending, layer_step


def edit_acts(acts, layer: int, edits: tuple, positions):
    """Apply the edits of `layer` to acts [..., pos, feature]; positions [pos] (absolute)."""
    for e in edits:
        if e.layer == layer:
            acts = acts.at[..., e.feature].set(e.apply(acts[..., e.feature], positions))
    return acts


@dataclass(frozen=True)
class SplicedTranscoder(MLPHook):
    """Every MLP replaced by the transcoder; frozen errors and feature edits optional (see the
    module docstring)."""

    cfg: TranscoderConfig
    errors: bool = False
    edits: tuple = ()
    layers: tuple[int, ...] | None = None  # spliced layers (None: all); per-layer kinds only

    def __post_init__(self):
        if self.layers is None:
            return
        if self.cfg.max_reach != 1:
            raise ConfigError(f"splicing only some layers needs a per-layer dictionary (PLT or "
                              f"SAE); this {self.cfg.kind.upper()}'s features write to later "
                              "layers: splice all of them")
        bad = [layer for layer in self.layers if layer not in self.cfg.model_layers]
        if bad and self.cfg.layers:
            raise ConfigError(f"spliced layers {bad} are not covered: this SAE has dictionaries "
                              f"at model layers {', '.join(map(str, self.cfg.layers))} only")
        if bad:
            raise ConfigError(f"spliced layers {bad} out of range 0..{self.cfg.n_layers - 1}")

    def _params(self, hook_params):
        return hook_params[0] if self.errors and not self.cfg.is_sae else hook_params

    def init(self, hook_params, x):
        pending = init_pending(self.cfg, self._params(hook_params), x)
        # With edits, also the pending writes of the unedited features (generation needs both).
        return (pending, pending) if self.edits else pending

    def apply(self, hook_params, layer, resid_mid, mlp_in, state, true_mlp):
        if (self.layers is not None and layer not in self.layers) or \
                layer not in self.cfg.model_layers:
            return true_mlp(mlp_in), state
        if self.cfg.is_sae:
            return self._apply_sae(hook_params, layer, resid_mid, mlp_in, state, true_mlp)
        x = self.cfg.read(resid_mid, mlp_in)
        if self.errors:
            tc, mlp_out, recon_prompt, positions = hook_params
        else:
            tc, positions = hook_params, jnp.arange(x.shape[-2])
        edited, plain = state if self.edits else (state, None)
        edit = None
        if self.edits:
            def edit(acts):
                return edit_acts(acts, layer, self.edits, positions)
        _, recon, edited = layer_step(self.cfg, tc, layer, x, edited, edit)
        if not self.errors:
            return recon, ((edited, plain) if self.edits else edited)
        P = recon_prompt.shape[-2]
        at_prompt = mlp_out[layer] + (recon[..., :P, :] - recon_prompt[layer])
        if x.shape[-2] > P:  # generated positions: the model's own MLP, plus the edits' change
            beyond = true_mlp(mlp_in[..., P:, :])
            if self.edits:
                _, unedited, plain = layer_step(self.cfg, tc, layer, x, plain)
                beyond = beyond + (recon - unedited)[..., P:, :]
            at_prompt = jnp.concatenate([at_prompt, beyond], axis=-2)
        return at_prompt.astype(x.dtype), ((edited, plain) if self.edits else edited)

    def _apply_sae(self, tc, layer, x, mlp_in, state, true_mlp):
        """The residual stream x before model layer `layer`'s MLP replaced by r (module
        docstring)."""
        if self.errors and not any(e.layer == layer for e in self.edits):
            return true_mlp(mlp_in), state  # r = x exactly: nothing edited here
        edit = None
        if self.edits:
            positions = jnp.arange(x.shape[-2])

            def edit(acts):
                return edit_acts(acts, layer, self.edits, positions)
        edited, plain = state if self.edits else (state, None)
        index = self.cfg.layer_index(layer)  # its dictionary
        _, recon, edited = layer_step(self.cfg, tc, index, x, edited, edit)
        if self.errors:
            _, unedited, plain = layer_step(self.cfg, tc, index, x, plain)
            r = x + (recon - unedited).astype(x.dtype)
        else:
            r = recon.astype(x.dtype)
        out = (r - x) + true_mlp.of_resid(r)
        return out.astype(x.dtype), ((edited, plain) if self.edits else edited)


__all__ = ["SplicedTranscoder", "edit_acts"]
