"""Config fields tell the truth: every field the code reads or sets is declared in
configs/default.py, and every declared field is read by the code.

The code is scanned, not listed: a static pass over the package and the benchmarks follows each
config object from where it enters a function (parameters named `config`, `c` or
`<section>_config`, any variable named `config`, results of a config file's `get_config()`,
and `self.<name>` set from one) through aliases (`m = config.model`,
`m, d = config.model, config.data`) and records every field taken from it by attribute,
`getattr`, `.get("name")` or subscript, including names that a `for` loop takes from a literal
tuple (`for field in ("width", "depth"): m[field]`). The config files are checked by building
them: none may add a field the default does not declare.
"""
from __future__ import annotations

import ast
import json
import glob
import importlib
import os

import ml_collections
import pytest

from configs import default

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCANNED = ("sove_jax", "benchmarks")
ROOT_NAMES = ("config", "c")  # parameters holding a whole config
MODULE_ROOTS = ("config",)     # a name that holds one wherever it is bound


def _fields(config, prefix=""):
  """(leaf paths, section paths) of a ConfigDict, dotted."""
  leaves, sections = set(), set()
  for key, value in config.items():
    path = prefix + key
    if isinstance(value, ml_collections.ConfigDict):
      sections.add(path)
      sub_leaves, sub_sections = _fields(value, path + ".")
      leaves |= sub_leaves
      sections |= sub_sections
    else:
      leaves.add(path)
  return leaves, sections


LEAVES, SECTIONS = _fields(default.get_config())
# The fine-tuning config (configs/finetune.py) is the other config of the project: in the
# fine-tuning module, `config` and `c` are it, and `<x>_config` (run_config) the training run's.
FINETUNE_LEAVES, FINETUNE_SECTIONS = _fields(
    importlib.import_module("configs.finetune").get_config())
FINETUNE_MODULE = os.path.join("sove_jax", "evaluate", "finetune.py")
METHODS = {name for name in dir(ml_collections.ConfigDict) if not name.startswith("_")}


def _join(section: str, name: str) -> str:
  return f"{section}.{name}" if section else name


class _Scan:
  """Collects (path, "read" | "write", where) for every config field access in one module."""

  def __init__(self, filename: str, leaves=LEAVES, sections=SECTIONS, roots=ROOT_NAMES,
               suffix_roots: bool = True, calls: bool = True):
    """`roots`: parameter names holding a whole config of this schema (`leaves`, `sections`);
    `suffix_roots`: `<section>_config` parameters too; `calls`: a `get_config()` result too."""
    self.filename = filename
    self.leaves, self.sections, self.roots = leaves, sections, roots
    self.suffix_roots, self.calls = suffix_roots, calls
    self.accesses: list[tuple[str, str, str]] = []

  # -- what an expression is ------------------------------------------------------------------

  def section(self, node, env) -> str | None:
    """The config section ("" = the whole config) that `node` denotes, or None."""
    if isinstance(node, ast.Name):
      return env.get(node.id)
    if isinstance(node, ast.Attribute):
      if isinstance(node.value, ast.Name) and node.value.id == "self":
        return env.get(f"self.{node.attr}")
      return self._child(self.section(node.value, env), [node.attr])
    if isinstance(node, ast.Subscript):
      return self._child(self.section(node.value, env), self.names(node.slice, env))
    if isinstance(node, ast.Call):
      func = node.func
      if self.calls and ((isinstance(func, ast.Attribute) and func.attr == "get_config") or (
          isinstance(func, ast.Name) and func.id == "get_config")):
        return ""  # a config file's get_config()
      target, names = self._call_field(node, env)
      return self._child(target, names)
    return None

  def _child(self, section, names):
    if section is None or len(names) != 1:
      return None
    path = _join(section, names[0])
    return path if path in self.sections else None

  @staticmethod
  def names(node, env) -> list[str]:
    """The field names a key expression can hold: a string, or a loop variable over strings."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
      return [node.value]
    if isinstance(node, ast.Name):
      return sorted(env.get(("loop", node.id), ()))
    return []

  def _call_field(self, node, env):
    """(section, names) for `getattr(cfg, name)` and `cfg.get(name, ...)`, else (None, [])."""
    if isinstance(node.func, ast.Name) and node.func.id == "getattr" and len(node.args) >= 2:
      return self.section(node.args[0], env), self.names(node.args[1], env)
    if (isinstance(node.func, ast.Attribute) and node.func.attr == "get" and node.args):
      return self.section(node.func.value, env), self.names(node.args[0], env)
    return None, []

  # -- scopes ---------------------------------------------------------------------------------

  def params_env(self, fn, env):
    env = dict(env)
    args = fn.args
    for a in args.posonlyargs + args.args + args.kwonlyargs:
      name = a.arg
      if name in self.roots:
        env[name] = ""
      elif name.endswith("_config") and self.suffix_roots:
        section = name[:-len("_config")]
        env[name] = section if section in self.sections else ""
      else:
        env.pop(name, None)  # a parameter shadows an outer alias
    return env

  def bind(self, body, env):
    """Aliases set in `body` (not inside nested functions or classes)."""
    nodes = []
    stack = list(body)
    while stack:
      node = stack.pop()
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
        continue
      nodes.append(node)
      stack.extend(ast.iter_child_nodes(node))
    for _ in range(3):  # aliases of aliases
      for node in nodes:
        if isinstance(node, ast.Assign):
          for target in node.targets:
            self._assign(target, node.value, env)
    return env

  def _assign(self, target, value, env):
    if isinstance(target, (ast.Tuple, ast.List)) and isinstance(value, (ast.Tuple, ast.List)):
      for t, v in zip(target.elts, value.elts):
        self._assign(t, v, env)
      return
    section = self.section(value, env)
    if section is None:
      return
    if isinstance(target, ast.Name):
      env[target.id] = section
    elif (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)
          and target.value.id == "self"):
      env[f"self.{target.attr}"] = section

  @staticmethod
  def loop_env(target, iterable, env):
    """`env` inside a loop: a variable that runs over literal strings holds those names there."""
    env = dict(env)
    targets = target.elts if isinstance(target, ast.Tuple) else [target]
    rows = ([e.elts if isinstance(e, (ast.Tuple, ast.List)) else [e] for e in iterable.elts]
            if isinstance(iterable, (ast.Tuple, ast.List)) else [])
    for i, t in enumerate(targets):
      if isinstance(t, ast.Name):
        env[("loop", t.id)] = {r[i].value for r in rows if i < len(r) and isinstance(
            r[i], ast.Constant) and isinstance(r[i].value, str)}
    return env

  # -- accesses -------------------------------------------------------------------------------

  def record(self, section, names, kind, node):
    for name in names:
      path = _join(section, name)
      if path in self.sections:
        continue
      if name in METHODS and path not in self.leaves:
        continue  # a ConfigDict method (update, get, to_dict, ...), not a field
      self.accesses.append((path, kind, f"{self.filename}:{node.lineno}"))

  def visit(self, body, env):
    env = self.bind(body, env)
    stack = list(body)
    while stack:
      node = stack.pop()
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        inner = node.body if isinstance(node.body, list) else [ast.Expr(node.body)]
        self.visit(inner, self.params_env(node, env))
        # Default values are evaluated where the function is defined.
        stack.extend(d for d in node.args.defaults + node.args.kw_defaults if d is not None)
        continue
      if isinstance(node, ast.ClassDef):
        self.visit_class(node, env)
        continue
      if isinstance(node, ast.For):
        self.visit(node.body, self.loop_env(node.target, node.iter, env))
        stack.extend([node.iter, *node.orelse])
        continue
      if isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
        inner = env
        for gen in node.generators:
          stack.append(gen.iter)
          inner = self.loop_env(gen.target, gen.iter, inner)
        parts = [node.key, node.value] if isinstance(node, ast.DictComp) else [node.elt]
        parts += [cond for gen in node.generators for cond in gen.ifs]
        self.visit([ast.Expr(p) for p in parts], inner)
        continue
      if isinstance(node, ast.Attribute) and not (
          isinstance(node.value, ast.Name) and node.value.id == "self"):
        section = self.section(node.value, env)
        if section is not None:
          kind = "write" if isinstance(node.ctx, ast.Store) else "read"
          self.record(section, [node.attr], kind, node)
      elif isinstance(node, ast.Subscript):
        section = self.section(node.value, env)
        if section is not None:
          kind = "write" if isinstance(node.ctx, ast.Store) else "read"
          self.record(section, self.names(node.slice, env), kind, node)
      elif isinstance(node, ast.Call):
        section, names = self._call_field(node, env)
        if section is not None:
          self.record(section, names, "read", node)
        if (isinstance(node.func, ast.Attribute) and node.func.attr == "update"):
          section = self.section(node.func.value, env)
          if section is not None:
            self.record(section, [k.arg for k in node.keywords if k.arg], "write", node)
      stack.extend(ast.iter_child_nodes(node))

  # class name -> its `self.x` config aliases, for subclasses (filled by a first pass over the
  # code: a base such as data/stream.py's TrainStream sets `self.config` for its subclasses).
  class_envs: dict = {}

  def visit_class(self, cls, env):
    """`self.x = <config>` in any method makes `self.x` config in every method, and in the
    methods of subclasses."""
    class_env = dict(env)
    for base in cls.bases:
      name = base.attr if isinstance(base, ast.Attribute) else getattr(base, "id", None)
      class_env.update(self.class_envs.get((id(self.leaves), name), {}))
    for _ in range(2):
      for fn in cls.body:
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
          scope = self.bind(fn.body, self.params_env(fn, class_env))
          class_env.update({k: v for k, v in scope.items()
                            if isinstance(k, str) and k.startswith("self.")})
    self.class_envs.setdefault((id(self.leaves), cls.name), {}).update(
        {k: v for k, v in class_env.items() if isinstance(k, str) and k.startswith("self.")})
    self.visit(cls.body, class_env)


def _scan(rel, tree, module_roots=MODULE_ROOTS, **schema):
  scan = _Scan(rel, **schema)
  scan.visit(tree.body, {name: "" for name in module_roots})
  return scan.accesses


def _scan_code():
  """Every access to the training config's fields (and, in the fine-tuning module, to the
  fine-tuning config's, returned second)."""
  trees = []
  for folder in SCANNED:
    for path in sorted(glob.glob(os.path.join(ROOT, folder, "**", "*.py"), recursive=True)):
      with open(path, encoding="utf-8") as f:
        trees.append((os.path.relpath(path, ROOT), ast.parse(f.read(), filename=path)))
  for _ in range(2):  # the first pass learns every class's config attributes (`class_envs`)
    accesses, finetune = [], []
    for rel, tree in trees:
      if rel != FINETUNE_MODULE:
        accesses += _scan(rel, tree)
        continue
      # run_config: the training run's; config and c: the fine-tuning config.
      accesses += _scan(rel, tree, module_roots=(), roots=(), calls=False)
      finetune += _scan(rel, tree, module_roots=("config", "c"), leaves=FINETUNE_LEAVES,
                        sections=FINETUNE_SECTIONS, suffix_roots=False)
  return accesses, finetune


@pytest.fixture(scope="module")
def scanned():
  found, finetune = _scan_code()
  assert len({p for p, kind, _ in found if kind == "read"}) > 50  # the scan does see the code
  assert len({p for p, kind, _ in finetune if kind == "read"}) > 15
  return found, finetune


@pytest.fixture(scope="module")
def accesses(scanned):
  return scanned[0]


def test_every_fine_tuning_field_is_declared_and_read(scanned):
  """The same two checks for configs/finetune.py and the fine-tuning module."""
  finetune = scanned[1]
  undeclared = sorted(f"{path} ({where})" for path, _, where in finetune
                      if path not in FINETUNE_LEAVES)
  assert not undeclared, "Fine-tuning fields not in configs/finetune.py:\n" + "\n".join(undeclared)
  unread = sorted(FINETUNE_LEAVES - {path for path, kind, _ in finetune if kind == "read"})
  assert not unread, f"Declared in configs/finetune.py but read nowhere: {unread}"


def test_every_field_the_code_uses_is_declared_in_the_default_config(accesses):
  undeclared = sorted(f"{path} ({kind} at {where})" for path, kind, where in accesses
                      if path not in LEAVES)
  assert not undeclared, "Config fields used but not declared in configs/default.py:\n" + \
      "\n".join(undeclared)


def test_every_declared_field_is_read_by_the_code(accesses):
  read = {path for path, kind, _ in accesses if kind == "read"}
  unread = sorted(LEAVES - read)
  assert not unread, f"Declared in configs/default.py but read nowhere: {unread}"


@pytest.mark.parametrize("name", sorted(
    os.path.splitext(os.path.basename(p))[0]
    for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
    if not os.path.basename(p).startswith("_") and os.path.basename(p) != "finetune.py"))
def test_config_files_only_set_declared_fields(name):
  module = importlib.import_module(f"configs.{name}")
  leaves, sections = _fields(module.get_config())
  assert leaves <= LEAVES and sections <= SECTIONS, sorted((leaves - LEAVES) | (sections - SECTIONS))


def test_the_scan_finds_reads_writes_and_aliases():
  """The scanner on a small module: each way of reading a field, and what it must ignore."""
  source = '''
def f(config, model_config, x):
  m, d = config.model, config.data
  a = m.width + model_config.depth + d["num_local"] + config.get("seed")
  for field in ("global_size", "local_size"):
    getattr(d, field)
  x.not_a_config_field
  config.model.update(patch_size=3)
  m.undeclared_thing = 1
  return config.to_dict()

def g():
  c = vitb.get_config()
  c.model.attention = "cudnn"
  return default.get_config().data.flip

class Input:
  def __init__(self, data_config):
    self.config = data_config
  def read(self):
    return self.config.mean
'''
  scan = _Scan("example.py")
  scan.visit(ast.parse(source).body, {})
  got = {(path, kind) for path, kind, _ in scan.accesses}
  assert got == {("model.width", "read"), ("model.depth", "read"), ("data.num_local", "read"),
                 ("seed", "read"), ("data.global_size", "read"), ("data.local_size", "read"),
                 ("model.patch_size", "write"), ("model.undeclared_thing", "write"),
                 ("data.mean", "read"), ("model.attention", "write"), ("data.flip", "read")}


# ------------------------------------------------------------------ model.variant acts

def test_model_variant_sets_the_size_and_positive_fields_replace_it():
  from sove_jax import configuration
  from sove_jax.models import network

  c = default.get_config()
  c.model.update(variant="b", width=0, depth=0, num_heads=0)
  assert network.vit_size(c.model) == (768, 12, 12)
  _, state = network.abstract_network(c.model, c.data.global_size)
  params = state.to_pure_dict()
  assert len(params["backbone"]["blocks"]) == 12
  assert params["backbone"]["blocks"][0]["attn"]["qkv"]["kernel"].shape == (768, 3, 12, 64)
  assert params["head"]["fc1"]["kernel"].shape[0] == 768  # the head follows the backbone
  c.model.depth = 2  # a positive field replaces the variant's value, the others stay
  assert network.vit_size(c.model) == (768, 2, 12)
  configuration.validate(c, num_devices=8)
  c.model.num_heads = 5
  with pytest.raises(configuration.ConfigError, match="width 768 must be divisible by its 5"):
    configuration.validate(c, num_devices=8)
  c.model.num_heads = -1
  with pytest.raises(configuration.ConfigError, match="model.num_heads=-1 must be >= 0"):
    configuration.validate(c, num_devices=8)


def test_a_run_started_before_a_field_existed_resumes_under_its_default(tmp_path):
  """config.json written before a field was added lacks it: the field's default (the old
  behaviour) fills it, and the restart is not refused as "configured otherwise"."""
  from configs import smoke
  from sove_jax import checkpoint, continuation
  config = smoke.get_config()
  checkpoint.write_config(config, tmp_path)
  stored = json.loads((tmp_path / "config.json").read_text())
  del stored["data"]["mask_prob"], stored["hosts"]
  (tmp_path / "config.json").write_text(json.dumps(stored))
  old = checkpoint.read_config(tmp_path)
  assert continuation.changed_fields(old, config, ignore=()) != {}
  filled = continuation.with_new_fields(old)
  assert filled.data.mask_prob == 1.0 and filled.hosts.stall_timeout_s > 0
  assert continuation.changed_fields(filled, config) == {}


def test_a_run_started_before_koleo_existed_resumes_without_it(tmp_path):
  """The default took KoLeo (weight 0.8) after the field was added at 0: a run whose
  config.json predates the field resumes with the term off, as it trained, not with the
  default's weight."""
  from configs import smoke
  from sove_jax import checkpoint, continuation
  config = smoke.get_config()
  assert config.sove.koleo_weight > 0
  checkpoint.write_config(config, tmp_path)
  stored = json.loads((tmp_path / "config.json").read_text())
  del stored["sove"]["koleo_weight"]
  (tmp_path / "config.json").write_text(json.dumps(stored))
  filled = continuation.with_new_fields(checkpoint.read_config(tmp_path))
  assert filled.sove.koleo_weight == 0.0
  assert continuation.changed_fields(filled, config) == {"sove.koleo_weight": (0.0, 0.8)}
