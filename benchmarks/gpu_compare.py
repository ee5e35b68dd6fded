r"""Our train step beside the authors' (the PyTorch peer): one table from both JSON lines.

    python benchmarks/gpu_compare.py PEER_RESULTS.jsonl OURS.jsonl

PEER_RESULTS.jsonl is shared/bench/run_peer_gpu.sh's (one line per configuration: name, mode,
step_ms_median, images_per_s, peak_mem_gib, device_name), OURS.jsonl `benchmarks/train_step.py
--json`'s (name, mode, ms, ips, temp_gib, device, attention). Rows pair by mode (full step,
backbone only); the ratio is the peer's time over ours (above 1: ours is faster). Both must come
from one call on one card (benchmarks/gpu_check.sh): the table names the cards and refuses to
pair rows measured on different ones.
"""
import json
import sys


def read(path: str) -> list[dict]:
  try:
    with open(path) as f:
      return [json.loads(line) for line in f if line.strip().startswith("{")]
  except FileNotFoundError:
    return []


def _same_card(a, b) -> bool:
  """PyTorch's and JAX's names of one card ("NVIDIA H200" both; one may add to the other)."""
  a, b = str(a or "").lower().strip(), str(b or "").lower().strip()
  return bool(a and b) and (a == b or a in b or b in a)


def table(peer: list[dict], ours: list[dict]) -> str:
  lines = ["| step | ours | attention | ours ms | peer ms | peer / ours | ours img/s | peer img/s "
           "| ours temp GiB | peer peak GiB |", "|---|---|---|---|---|---|---|---|---|---|"]
  cards = {r.get("device") for r in ours} | {r.get("device_name") for r in peer}
  cards.discard(None)
  for mine in ours:
    twin = next((r for r in peer if r.get("mode") == mine.get("mode") and "error" not in r), None)
    same_card = twin is not None and _same_card(twin.get("device_name"), mine.get("device"))
    peer_ms = twin.get("step_ms_median") if same_card else None
    ratio = f"{peer_ms / mine['ms']:.2f}" if peer_ms else "–"
    lines.append(
        f"| {mine.get('mode')} | {mine.get('name')} | {mine.get('attention')} | {mine['ms']:.1f} | "
        f"{'–' if not peer_ms else f'{peer_ms:.1f}'} | {ratio} | {mine['ips']:.0f} | "
        f"{'–' if not same_card else twin.get('images_per_s')} | {mine.get('temp_gib', 0):.2f} | "
        f"{'–' if not same_card else twin.get('peak_mem_gib')} |")
  errors = [f"{r.get('name')}: {r['error']}" for r in peer if "error" in r]
  lines.append("")
  lines.append(f"Cards: {', '.join(sorted(map(str, cards))) or 'none reported'}.")
  if errors:
    lines.append("Peer errors: " + "; ".join(errors) + ".")
  if not ours:
    lines.append("No row of ours (see the log).")
  return "\n".join(lines)


def main(argv):
  if len(argv) != 3:
    sys.exit("usage: python benchmarks/gpu_compare.py PEER_RESULTS.jsonl OURS.jsonl")
  print(table(read(argv[1]), read(argv[2])))


if __name__ == "__main__":
  main(sys.argv)
