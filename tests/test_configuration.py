"""Config files load from anywhere and pass the checks; bad values stop with one sentence."""
import pathlib
import shutil

import pytest
from absl import flags
from ml_collections import config_flags

from sove_jax import configuration

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
# Training configs (`python -m sove_jax.main --config=...`); configs/finetune.py is the fine-tuning
# command's and is checked by tests/test_finetune.py.
CONFIG_FILES = sorted(p.name for p in CONFIGS.glob("*.py")
                      if p.name not in ("__init__.py", "finetune.py"))


def _load_as_the_flag_does(path):
  """The config that `--config=PATH` gives (ml_collections loads the file by its path)."""
  flag_values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", str(path), flag_values=flag_values)
  flag_values(["test"])
  return holder.value


def test_variants_load_their_base_from_their_own_folder(tmp_path, monkeypatch):
  """A copy of configs/ elsewhere: each variant must build on the copy's default.py, not on a
  `configs` package that happens to be importable, whatever the working directory."""
  copy = tmp_path / "elsewhere" / "my_configs"
  shutil.copytree(CONFIGS, copy)
  default = copy / "default.py"
  default.write_text(default.read_text().replace("c.seed = 0", "c.seed = 4242"))
  monkeypatch.chdir(tmp_path)
  for name in CONFIG_FILES:
    config = _load_as_the_flag_does(copy / name)
    assert config.seed == 4242, name


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_every_config_passes_the_checks(name):
  config = configuration.load(CONFIGS / name)
  if config.data.source == "folder" and not config.data.data_dir:
    config.data.data_dir = "/images"  # the rehearsal sets it to the JPEG set it writes
  configuration.validate(config, num_devices=8, process_count=1)


def test_a_missing_sibling_says_which_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="nothing.py does not exist"):
    configuration.sibling("nothing", of=str(tmp_path / "variant.py"))
