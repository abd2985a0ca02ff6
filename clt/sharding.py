"""Sharding by logical axis names (the MaxText / flax convention).

Transcoder parameters carry logical axes (`layer`, `d_model`, `feature`); one rules table maps
them onto a mesh with axes ('data', 'feature'): features are split over 'feature' (parameters and
optimizer state), tokens of a batch over 'data'; with several processes, `data_share` says which
rows of a batch each one supplies. With a 1x1 mesh, or no mesh, nothing is sharded
and the same code runs on one device.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from clt.configs import ConfigError
from clt.transcoder import TranscoderConfig, TranscoderParams

MESH_AXES = ("data", "feature")
# logical axis -> mesh axis (None: replicated).
RULES = {"feature": "feature", "batch": "data", "layer": None, "d_model": None, "target": None,
         "d_in": None}


def logical_axes(cfg: TranscoderConfig) -> TranscoderParams:
    """The logical axis names of every transcoder parameter, as a TranscoderParams of tuples."""
    return TranscoderParams(
        W_enc=("layer", "d_model", "feature"), b_enc=("layer", "feature"),
        log_threshold=("layer", "feature"),
        W_dec=tuple(("feature", "target", "d_model") for _ in range(cfg.n_layers)),
        b_dec=("layer", "d_model"),
        W_skip=("layer", "d_in", "d_model") if cfg.skip else None)


def spec(axes: tuple[str, ...]) -> P:
    return P(*(RULES[a] for a in axes))


def _is_axes(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(a, str) for a in x)


def param_shardings(cfg: TranscoderConfig, mesh: Mesh) -> TranscoderParams:
    return jax.tree.map(lambda axes: NamedSharding(mesh, spec(axes)), logical_axes(cfg),
                        is_leaf=_is_axes)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Tokens over 'data'; layers and d_model replicated."""
    return NamedSharding(mesh, P("data", None, None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def make_mesh(data: int = 1, feature: int = 1, devices=None) -> Mesh:
    """A ('data', 'feature') mesh over the devices (default all); -1 fills that axis."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if data == -1 and feature == -1:
        raise ConfigError("only one of mesh_data / mesh_feature may be -1")
    if data == -1:
        data = n // feature
    if feature == -1:
        feature = n // data
    if data < 1 or feature < 1 or data * feature > n:
        raise ConfigError(f"mesh data={data} x feature={feature} needs {data * feature} devices, "
                          f"{n} are available; choose sizes whose product is at most {n} (or -1 "
                          "to fill one axis)")
    # A smaller mesh than the machine uses the first devices (e.g. 1x1 for an unsharded run).
    return Mesh(np.asarray(devices[:data * feature]).reshape(data, feature), MESH_AXES)


def data_share(mesh: Mesh) -> tuple[int, int] | None:
    """(this process's share, the number of shares) of a batch laid out over `mesh`: one
    process is (0, 1); several are one share each when every process's devices hold one
    contiguous block of the 'data' axis, the same size for all (then each supplies only its
    rows of every batch: `jax.make_array_from_process_local_data`). None when they do not (a
    process on rows of another, or none): each process then needs whole batches."""
    if jax.process_count() == 1:
        return 0, 1
    rows = np.moveaxis(mesh.devices, mesh.axis_names.index("data"), 0)
    owners = []
    for row in rows:
        procs = {d.process_index for d in np.ravel(row)}
        if len(procs) != 1:
            return None
        owners.append(procs.pop())
    n = jax.process_count()
    if len(owners) % n:
        return None
    k = len(owners) // n
    blocks = [owners[i * k:(i + 1) * k] for i in range(n)]
    order = [b[0] for b in blocks]
    if any(len(set(b)) != 1 for b in blocks) or sorted(order) != list(range(n)):
        return None
    return order.index(jax.process_index()), n


def check_divisible(cfg: TranscoderConfig, mesh: Mesh, batch_tokens: int) -> None:
    f, d = mesh.shape["feature"], mesh.shape["data"]
    if cfg.n_features % f:
        raise ConfigError(f"n_features={cfg.n_features} is not divisible by the mesh's feature "
                          f"axis ({f}); choose n_features as a multiple of {f}")
    if batch_tokens % d:
        raise ConfigError(f"batch_tokens={batch_tokens} is not divisible by the mesh's data axis "
                          f"({d})")


__all__ = ["MESH_AXES", "RULES", "batch_sharding", "check_divisible", "data_share",
           "logical_axes", "make_mesh", "param_shardings", "replicated", "spec"]
