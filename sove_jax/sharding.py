"""The device mesh and how every array of the run is laid out on it.

Two mesh axes: `data` (pure data parallelism) and `fsdp` (data parallelism whose devices also
split the parameters and optimizer state). The batch is split over both. Parameters carry
logical axis names (set in `sove_jax.models`); `LOGICAL_RULES` maps them to mesh axes when the
config asks for FSDP, and a dimension that does not divide evenly stays replicated.
"""
import jax
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")

# Logical parameter axis -> mesh axis under FSDP. One matrix dimension per parameter is enough
# to divide its memory by the fsdp size; the model width is present in every block matrix.
LOGICAL_RULES = (
    ("embed", "fsdp"),
    ("proj_hidden", "fsdp"),
)


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


def batch_sharding(mesh) -> NamedSharding:
  """Leading (batch) axis split over every device."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def logical_to_mesh(names, shape, mesh, rules=LOGICAL_RULES) -> P:
  """Maps one parameter's logical names to a PartitionSpec, skipping uneven or reused axes."""
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


def param_shardings(param_specs, abstract_params, mesh, shard_params: bool):
  """NamedShardings for a parameter tree from its logical specs: FSDP by rule, or replicated.

  `param_specs` holds one PartitionSpec of logical names per parameter (from
  `nnx.get_partition_spec(...).to_pure_dict()`), `abstract_params` the matching shapes.
  """
  def one(spec, x):
    if not shard_params:
      return replicated(mesh)
    return NamedSharding(mesh, logical_to_mesh(tuple(spec), x.shape, mesh))

  return jax.tree.map(one, param_specs, abstract_params, is_leaf=lambda s: isinstance(s, P))


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

