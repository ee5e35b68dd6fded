"""The device mesh and how every array of the run is laid out on it.

Two mesh axes: `data` (pure data parallelism) and `fsdp` (data parallelism whose devices also
split the parameters and optimizer state). The batch is split over both. Parameters carry
logical axis names (set in `sove_jax.models`); the config's `mesh.rules` map them to mesh axes
when it asks for FSDP, and a dimension that does not divide evenly stays replicated. With FSDP,
`check_param_shardings` logs every parameter's layout and refuses a run whose parameters stay
mostly replicated (a rule that matches nothing, a width the fsdp axis does not divide).
"""
import collections
import math
import re

import jax
import optax
from absl import logging
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from sove_jax.configuration import ConfigError
from sove_jax.models import LOGICAL_AXES

BATCH_AXES = ("data", "fsdp")


def make_mesh(mesh_config, devices=None) -> jax.sharding.Mesh:
  """A (data, fsdp) mesh over all devices; `data = -1` takes whatever fsdp leaves."""
  devices = jax.devices() if devices is None else devices
  n = len(devices)
  fsdp = int(mesh_config.fsdp)
  data = int(mesh_config.data)
  if fsdp < 1 or n % fsdp:
    raise ValueError(f"mesh.fsdp={fsdp} must be a positive divisor of the {n} devices.")
  if data == -1:
    data = n // fsdp
  if data * fsdp != n:
    raise ValueError(f"mesh.data={data} x mesh.fsdp={fsdp} must equal the {n} devices.")
  return jax.make_mesh((data, fsdp), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2,
                       devices=devices)


def batch_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D "data" mesh over `devices` (default all): evaluation shards its batches and the k-NN
  memory over it, whatever mesh the run was trained on."""
  devices = jax.devices() if devices is None else list(devices)
  return jax.make_mesh((len(devices),), ("data",), axis_types=(AxisType.Auto,), devices=devices)


def batch_sharding(mesh) -> NamedSharding:
  """Leading (batch) axis split over every device."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def logical_to_mesh(names, shape, mesh, rules) -> P:
  """Maps one parameter's logical names to a PartitionSpec by `rules` ((logical, mesh axis)
  pairs), skipping dimensions that do not divide evenly and mesh axes already used."""
  table = dict(rules)
  used, spec = set(), []
  for name, dim in zip(tuple(names or ()) + (None,) * len(shape), shape):
    axis = table.get(name) if name is not None else None
    if axis is None or axis in used or dim % mesh.shape[axis]:
      spec.append(None)
      continue
    used.add(axis)
    spec.append(axis)
  return P(*spec)


def param_shardings(param_specs, abstract_params, mesh, rules=()):
  """NamedShardings for a parameter tree from its logical specs by `rules` (FSDP); replicated
  without rules.

  `param_specs` holds one PartitionSpec of logical names per parameter (from
  `nnx.get_partition_spec(...).to_pure_dict()`), `abstract_params` the matching shapes.
  """
  is_spec = lambda x: isinstance(x, P)
  carried = {name for spec in jax.tree.leaves(param_specs, is_leaf=is_spec) for name in spec
             if name is not None}
  for logical, mesh_axis in rules:
    # A rule for another network's axis ("prototypes" in a SOVE run) is idle, not a mistake;
    # a name that no network of the project carries is.
    if logical not in carried and logical not in LOGICAL_AXES:
      raise ConfigError(f"mesh.rules maps {logical!r}, which no parameter carries (they carry "
                        f"{', '.join(sorted(carried))}).")
    if mesh_axis not in mesh.axis_names:
      raise ConfigError(f"mesh.rules maps {logical!r} to {mesh_axis!r}, not a mesh axis "
                        f"({', '.join(mesh.axis_names)}).")

  def one(spec, x):
    if not rules:
      return replicated(mesh)
    return NamedSharding(mesh, logical_to_mesh(tuple(spec), x.shape, mesh, rules))

  return jax.tree.map(one, param_specs, abstract_params, is_leaf=is_spec)


def check_param_shardings(shardings, abstract_params, *, max_replicated: float):
  """Logs each parameter's PartitionSpec (blocks grouped), and raises ConfigError when more
  than `max_replicated` of the parameter bytes would stay whole on every device."""
  rows = collections.OrderedDict()
  total = replicated_bytes = 0
  for (path, sh), x in zip(jax.tree_util.tree_leaves_with_path(shardings),
                           jax.tree.leaves(abstract_params)):
    size = math.prod(x.shape) * x.dtype.itemsize
    total += size
    shards = math.prod(sh.mesh.shape[axis] for entry in sh.spec if entry is not None
                       for axis in (entry if isinstance(entry, tuple) else (entry,)))
    replicated_bytes += size if shards == 1 else 0
    name = re.sub(r"\.\d+(?=\.|$)", ".*", ".".join(str(k.key) for k in path))
    rows.setdefault((name, x.shape, str(sh.spec)), 0)
    rows[(name, x.shape, str(sh.spec))] += 1
  share = replicated_bytes / max(total, 1)
  if jax.process_index() == 0:
    lines = [f"  {name:<40} {'x' + str(count) if count > 1 else '':>4} {str(shape):<24} {spec}"
             for (name, shape, spec), count in rows.items()]
    logging.info("Parameter shardings (%.2f%% of %.1f MiB replicated):\n%s", 100 * share,
                 total / 2**20, "\n".join(lines))
  fsdp = max((sh.mesh.shape["fsdp"] for sh in jax.tree.leaves(shardings)), default=1)
  if fsdp > 1 and share > max_replicated:
    raise ConfigError(
        f"With mesh.fsdp={fsdp}, {100 * share:.1f}% of the parameter bytes stay replicated, "
        f"more than mesh.max_replicated={max_replicated:g}: check mesh.rules and that the "
        "sharded dimensions divide by mesh.fsdp.")


def optimizer_shardings(tx, abstract_opt_state, params_shardings, mesh):
  """Optimizer-state shardings: parameter-shaped leaves follow their parameter, others replicate."""
  return optax.tree_utils.tree_map_params(
      tx, lambda _, s: s, abstract_opt_state, params_shardings,
      transform_non_params=lambda _: replicated(mesh),
      is_leaf=lambda s: isinstance(s, NamedSharding))


def devices_summary(mesh) -> str:
  return (f"{mesh.devices.size} devices ({jax.devices()[0].platform}), "
          f"mesh data={mesh.shape['data']} fsdp={mesh.shape['fsdp']}, "
          f"{jax.process_count()} process(es)")

