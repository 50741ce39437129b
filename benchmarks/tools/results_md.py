"""Renders a device's RESULTS.md from the harness JSONs in its results directory.

  python benchmarks/tools/results_md.py benchmarks/results/h200 [benchmarks/results/cpu-2core ...]

Reads attention.json (benchmarks/attention.py) and any attention_<suites>.json (a later run of
some suites alone, its rows left out of attention.json), mlp.json (benchmarks/mlp.py) and memory.txt
(benchmarks/memory_cpu.py) where present, and overwrites <dir>/RESULTS.md: for each suite
one row per workload with our time and rate, each peer's rate, the best peer and the ratio
(best peer's time / ours: > 1 means jax_fmha is faster), and where each file came from (the
device, the git revision, the command). Rerun it after a harness run overwrites the JSONs.
"""

from __future__ import annotations

import json
import os
import statistics
import sys

OURS, DENSE = "jax_fmha", "jax_fmha_dense"
SUITE_TITLES = {
  "prefill": "Prefill (self-attention)",
  "gqa": "Prefill with grouped-query attention",
  "paged": "Paged prefill",
  "decode": "Paged decode",
  "varlen": "Variable-length (packed) prefill",
  "fp8": "FP8 prefill (e4m3 q, k, v)",
}


def command(argv) -> str:
  """The recorded command, with the script path relative to the repository."""
  if not argv:
    return "not recorded"
  script = argv[0]
  if "benchmarks/" in script:
    script = "benchmarks/" + script.split("benchmarks/", 1)[1]
  return "python " + " ".join([script, *argv[1:]])


def revision(record) -> str:
  git, note = record.get("git"), record.get("git_note")
  if not git:
    return note or "not recorded"
  return f"`{git}`" + (f" ({note})" if note else "")


def number(x) -> str:
  if x is None:
    return "-"
  if x >= 100:
    return f"{x:.0f}"
  if x >= 10:
    return f"{x:.1f}"
  return f"{x:.3g}"


def ratio_range(values) -> str:
  values = [v for v in values if v is not None]
  if not values:
    return "no ratio"
  return (
    f"{min(values):.2f}-{max(values):.2f}x the best peer "
    f"(median {statistics.median(values):.2f}x, {len(values)} workloads)"
  )


def short_note(note: str) -> str:
  note = note.replace("|", "/").strip()
  return note if len(note) <= 110 else note[:107] + "..."


def attention_json(name) -> bool:
  return name == "attention.json" or (name.startswith("attention_") and name.endswith(".json"))


def attention_section(record, directory, name="attention.json") -> list[str]:
  title = "Attention (`benchmarks/attention.py`)"
  if name != "attention.json":
    title += f", suites {', '.join(record.get('suites', []))} (`{name}`)"
  out = [f"## {title}", ""]
  build = record.get("jax_fmha_build")
  if isinstance(build, dict):
    build = f"jax_fmha {build.get('version')}, backends {', '.join(build.get('backends', []))}" + (
      f", CUDA {', '.join(build['cuda_architectures'])}" if build.get("cuda_architectures") else ""
    )
  out += [
    f"- Device: {record.get('device')} ({record.get('backend')}, {record.get('cpu_count')} "
    f"host CPUs), {record.get('date', 'date not recorded')}",
    f"- Software: jax {record.get('jax_version')}; {build}",
    f"- Revision: {revision(record)}",
    f"- Command: `{command(record.get('argv'))}`",
    *([f"- Note: {record['note']}"] if record.get("note") else []),
    f"- dtype {record.get('dtype')}"
    + (" (the `cpu` suite runs float32 and bfloat16)" if "cpu" in record.get("suites", []) else "")
    + f", sizes "
    f"`{record.get('size')}`; dispatch floor "
    f"{record.get('dispatch_floor_ms', 0) * 1e3:.1f} us per call"
    + (
      f"; load average {record['load_average'][0]:.1f} at the start, "
      f"{record['load_average_end'][0]:.1f} at the end"
      if record.get("backend") == "cpu" and "load_average_end" in record
      else ""
    ),
    "- Peers: "
    + (", ".join(f"{k}: {v}" for k, v in record.get("peers", {}).items()) or "as listed per suite"),
    "",
    "Rates are TFLOP/s (4 * B * Hq * Sq * Sk * D, half when causal) or, for decode, GB/s of "
    "KV cache read. **ratio** = the best peer's time / ours (> 1: jax_fmha is faster); a "
    "peer whose output differs from ours is not counted as best. `-`: did not run (notes "
    "below each table).",
    "",
  ]
  rows = record["rows"]
  for suite in dict.fromkeys(r["suite"] for r in rows):
    srows = [r for r in rows if r["suite"] == suite]
    metric, unit = srows[0]["metric"], 1.0
    if metric == "TFLOP/s" and all(v < 1 for r in srows for v in r["rate"].values()):
      metric, unit = "GFLOP/s", 1e3  # CPU rates
    impls = list(dict.fromkeys(n for r in srows for n in (*r["ms"], *r["notes"])))
    peers = [n for n in impls if n not in (OURS, DENSE)]
    dense = any(DENSE in r["ms"] for r in srows)
    splits = any("num_splits" in r["shape"] for r in srows)
    out += [
      f"### {SUITE_TITLES.get(suite, suite)}",
      "",
      f"{suite}: ours {ratio_range([r.get('speedup') for r in srows])}.",
      "",
    ]
    head = [
      "workload",
      "ours ms",
      f"ours {metric}",
      *(f"{p} {metric}" for p in peers),
      "best peer",
      "ratio",
    ]
    if dense:
      head += [f"{DENSE} {metric}", "paged / dense"]
    if splits:
      head += ["splits"]
    out += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in srows:
      rate = {n: v * unit for n, v in r["rate"].items()}
      cells = [
        r["label"],
        number(r["ms"].get(OURS)),
        number(rate.get(OURS)),
        *(number(rate.get(p)) for p in peers),
        r.get("best_peer") or "-",
        f"**{r['speedup']:.2f}**" if r.get("speedup") else "-",
      ]
      if dense:
        cells += [number(rate.get(DENSE)), f"{r['vs_dense']:.2f}" if "vs_dense" in r else "-"]
      if splits:
        cells += [str(r["shape"].get("num_splits", "-"))]
      out.append("| " + " | ".join(cells) + " |")
    notes = {}
    for r in srows:
      for name, note in r["notes"].items():
        notes.setdefault((name, short_note(note)), []).append(r["label"])
    if notes:
      out += ["", "Notes:"]
      for (name, note), labels in notes.items():
        where = labels[0] if len(labels) == 1 else f"{len(labels)} workloads"
        out.append(f"- {name} ({where}): {note}")
    png = f"attention_{suite}.png"
    if os.path.exists(os.path.join(directory, png)):
      out += ["", f"![{suite}]({png})"]
    out.append("")
  return out


def mlp_section(record) -> list[str]:
  build = record.get("jax_fmha") or {}
  out = [
    "## MLP ops (`benchmarks/mlp.py`)",
    "",
    f"- Device: {record.get('device')} ({record.get('backend')}; {record.get('machine')})"
    + (f", {record['date']}" if record.get("date") else ""),
    f"- Software: jax {record.get('jax_version')}; jax_fmha {build.get('version')}, "
    f"backends {', '.join(build.get('backends', []))}; tokamax: {record.get('tokamax')}",
    f"- Revision: {revision(record)}",
    f"- Command: `{command(record.get('argv'))}`",
    f"- {record.get('dtype')}, {record.get('tokens')} tokens, hidden {record.get('hidden')}, "
    f"intermediate {record.get('intermediate')}; per call: median over 5 batches of "
    f"{record.get('reps')} queued calls"
    + (
      f"; in program: {record['in_program_calls']} calls in one jitted function"
      if record.get("in_program_calls")
      else ""
    ),
    "",
    "GB/s counts the bytes the op must move. **ratio** = the baseline's time / ours (> 1: "
    "jax_fmha is faster).",
    "",
  ]
  results = record["results"]
  in_program = any("in_program_ms" in r for r in results)
  head = ["op", "baseline", "ours ms", "ours GB/s", "baseline ms", "baseline GB/s", "ratio"]
  if in_program:
    head += ["in program: ours ms", "baseline ms", "ratio"]
  out += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
  ours = {}
  for r in results:
    if r["implementation"] == OURS:
      ours[r["op"]] = r
      continue
    o = ours.get(r["op"], {})
    cells = [
      r["op"],
      r["implementation"],
      f"{o.get('time_ms', float('nan')):.3f}",
      number(o.get("gb_per_s")),
      f"{r['time_ms']:.3f}",
      number(r["gb_per_s"]),
      f"**{r['jax_fmha_speedup']:.2f}**" if "jax_fmha_speedup" in r else "-",
    ]
    if in_program:
      cells += [
        f"{o['in_program_ms']:.3f}" if "in_program_ms" in o else "-",
        f"{r['in_program_ms']:.3f}" if "in_program_ms" in r else "-",
        f"{r['jax_fmha_in_program_speedup']:.2f}" if "jax_fmha_in_program_speedup" in r else "-",
      ]
    out.append("| " + " | ".join(cells) + " |")
  out.append("")
  return out


def memory_section(text) -> list[str]:
  lines = [line for line in text.splitlines() if line.strip()]
  keep = [line for line in lines if not line.startswith("\t") and "rerun under" not in line]
  peak = [
    line.strip() for line in lines if line.startswith("\t") and "Maximum resident set size" in line
  ]
  return [
    "## Peak memory on the CPU (`benchmarks/memory_cpu.py`)",
    "",
    "Command: `/usr/bin/time -v python benchmarks/memory_cpu.py` (memory.txt holds the "
    "whole output)",
    "",
    "```",
    *keep,
    *peak,
    "```",
    "",
  ]


def render(directory: str) -> str:
  name = os.path.basename(os.path.normpath(directory))
  parts = [
    f"# Benchmark results: {name}",
    "",
    "Generated by `python benchmarks/tools/results_md.py "
    f"benchmarks/results/{name}` from the JSON files beside it; rerun the commands "
    "below to overwrite them, then this file.",
    "",
  ]
  # attention.json, then any later run of some suites alone (attention_<suites>.json).
  for name in sorted(n for n in os.listdir(directory) if attention_json(n)):
    with open(os.path.join(directory, name)) as f:
      parts += attention_section(json.load(f), directory, name)
  path = os.path.join(directory, "mlp.json")
  if os.path.exists(path):
    with open(path) as f:
      parts += mlp_section(json.load(f))
  path = os.path.join(directory, "memory.txt")
  if os.path.exists(path):
    with open(path) as f:
      parts += memory_section(f.read())
  return "\n".join(parts).rstrip() + "\n"


def main(argv) -> None:
  if not argv:
    sys.exit(__doc__)
  for directory in argv:
    path = os.path.join(directory, "RESULTS.md")
    with open(path, "w") as f:
      f.write(render(directory))
    print(f"wrote {path}")


if __name__ == "__main__":
  main(sys.argv[1:])
