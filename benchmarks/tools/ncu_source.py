"""Where a kernel's warps stall, per SASS instruction: a summary of Nsight Compute's source page.

  ncu -k regex:attention_forward -c 1 --section SourceCounters --section WarpStateStats \\
      -o /tmp/rep python3 benchmarks/tools/ncu_targets.py prefill
  ncu -i /tmp/rep.ncu-rep --page source --csv --print-source sass > source.csv
  python3 benchmarks/tools/ncu_source.py source.csv [--top 40]

(`device_run.sh ncu-source=TARGET` runs all three.) Prints the warp-state samples by opcode
(the first word of each instruction, predicate and modifiers dropped: `HGMMA`, `MUFU`,
`SYNCS`, ...) and the instructions that drew the most samples, with their address and text.
The sampled warps' share of an instruction is where the kernel waits, not what it issues:
the samples land on the instruction a warp cannot issue yet.
"""

from __future__ import annotations

import argparse
import collections
import csv
import re
import sys

# Column names as Nsight Compute's source page writes them; versions differ, so each is the
# first of its candidates found (matched as prefixes: versions append units or qualifiers).
SAMPLES = ("Warp Stall Sampling (All Samples)", "# Samples")
NOT_ISSUED = ("Warp Stall Sampling (Not-issued Samples)",)
EXECUTED = ("Instructions Executed",)
# Per-reason sample columns: metric names, or the short labels of some versions.
REASON_PREFIXES = ("smsp__pcsamp_warps_issue_stalled_", "stall_")


def read_rows(path: str) -> tuple[list[str], list[dict[str, str]]]:
  """The header (the first row naming a `Source` column) and the rows after it."""
  with open(path, newline="") as f:
    rows = list(csv.reader(f))
  for i, row in enumerate(rows):
    if "Source" in row:
      header = row
      return header, [dict(zip(header, r)) for r in rows[i + 1 :] if len(r) == len(header)]
  raise ValueError(f"{path}: no header row with a 'Source' column (is it --page source --csv?)")


def column(header: list[str], candidates: tuple[str, ...]) -> str | None:
  return next((n for c in candidates for n in header if n.startswith(c)), None)


def reason_columns(header: list[str]) -> dict[str, str]:
  """Stall reason -> its column (all samples, not the not-issued share)."""
  reasons = {}
  for name in header:
    prefix = next((p for p in REASON_PREFIXES if name.startswith(p)), None)
    if prefix and not name.endswith("_not_issued"):
      reasons[name[len(prefix) :]] = name
  return reasons


def number(text: str) -> float:
  try:
    return float(text.replace(",", ""))
  except ValueError:
    return 0.0


def opcode(sass: str) -> str:
  """`@!P0 HGMMA.64x128x16.F32.BF16 ...` -> `HGMMA`."""
  words = [w for w in sass.split() if not w.startswith("@")]
  return re.split(r"[.\s]", words[0])[0] if words else "?"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("csv", help="ncu -i REPORT --page source --csv --print-source sass")
  parser.add_argument("--top", type=int, default=40, help="instructions listed (default 40)")
  args = parser.parse_args(argv)

  header, rows = read_rows(args.csv)
  samples, not_issued = column(header, SAMPLES), column(header, NOT_ISSUED)
  executed, address = column(header, EXECUTED), column(header, ("Address", "# Address"))
  reasons = reason_columns(header)
  if samples is None:
    print(f"no sample column ({' or '.join(SAMPLES)}); the columns: {header}", file=sys.stderr)
    return 1
  total = sum(number(r[samples]) for r in rows) or 1.0
  print(f"{len(rows)} instructions, {total:.0f} warp-state samples")

  if reasons:
    by_reason = {name: sum(number(r[c]) for r in rows) for name, c in reasons.items()}
    print("\nsamples by stall reason:")
    for name, count in sorted(by_reason.items(), key=lambda kv: -kv[1])[:12]:
      print(f"  {name:28s} {count:9.0f}  {count / total:6.1%}")

  by_opcode = collections.Counter()
  for r in rows:
    by_opcode[opcode(r["Source"])] += number(r[samples])
  print("\nsamples by opcode:")
  for name, count in by_opcode.most_common(20):
    print(f"  {name:10s} {count:9.0f}  {count / total:6.1%}")

  print(f"\nthe {args.top} instructions with the most samples:")
  extra = {c: label for c, label in ((not_issued, "not issued"), (executed, "executed")) if c}
  labels = " ".join(f"{label:>10s}" for label in extra.values())
  print(f"  {'address':>8s} {'samples':>8s} {'share':>6s} {labels}")
  for r in sorted(rows, key=lambda r: -number(r[samples]))[: args.top]:
    cells = " ".join(f"{number(r[c]):10.0f}" for c in extra)
    where = r[address] if address else ""
    share = number(r[samples]) / total
    top = sorted(reasons.items(), key=lambda kv: -number(r[kv[1]]))[:2]
    why = ", ".join(f"{name} {number(r[c]):.0f}" for name, c in top if number(r[c]) > 0)
    print(f"  {where:>8s} {number(r[samples]):8.0f} {share:6.1%} {cells}  {r['Source'][:80]}")
    if why:
      print(f"  {'':>8s} {'':>8s} {'':>6s} ({why})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
