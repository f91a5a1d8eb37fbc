"""`make mutation`'s report: reads mutmut's results (run from the project root after `mutmut run`) and writes
a markdown file with each mutated module's score and every mutant that was not killed, with its diff, so the
survivors can be judged in docs/testing.md. Exits 1 when a module scores under TARGET."""

from __future__ import annotations

import platform
import re
import subprocess
import sys
from collections import Counter, defaultdict
from datetime import date
from pathlib import Path

TARGET = 0.90
CAUGHT = {"killed", "timeout", "caught by type check"}  # a timeout is a mutant the tests stopped (an endless loop)
LINE = re.compile(r"^\s+(\S+): (.+)$")


def results() -> dict[str, str]:
    out = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], capture_output=True,
                         text=True, check=True).stdout
    return {m.group(1): m.group(2).strip() for m in map(LINE.match, out.splitlines()) if m}


def module_of(mutant: str) -> str:
    return mutant.split(".x_")[0].split(".xǁ")[0]


def diff(mutant: str) -> str:
    out = subprocess.run([sys.executable, "-m", "mutmut", "show", mutant], capture_output=True, text=True).stdout
    return "\n".join(line for line in out.splitlines()[1:] if line.startswith(("+", "-")) and
                     not line.startswith(("+++", "---")))


def main(path: str) -> int:
    status = results()
    if not status:
        print("no mutmut results: run `mutmut run` first", file=sys.stderr)
        return 2
    counts: dict[str, Counter] = defaultdict(Counter)
    for mutant, state in status.items():
        counts[module_of(mutant)]["caught" if state in CAUGHT else state] += 1
    lines = [f"# Mutation testing: last run\n\n`make mutation` wrote this on {date.today()} ({platform.machine()}, "
             f"{len(status)} mutants). A module passes at >= {TARGET:.0%} caught (killed or timed out); every "
             f"mutant not caught is listed with its change; docs/testing.md says why each one left is "
             f"equivalent or acceptable.\n",
             "| module | mutants | caught | survived | no tests | other | score |", "|---|---|---|---|---|---|---|"]
    failing = []
    for module in sorted(counts):
        c = counts[module]
        total = sum(c.values())
        other = total - c["caught"] - c["survived"] - c["no tests"]
        score = c["caught"] / total
        failing += [module] if score < TARGET else []
        lines.append(f"| {module} | {total} | {c['caught']} | {c['survived']} | {c['no tests']} | {other} | "
                     f"{score:.1%} |")
    everything = sum(sum(c.values()) for c in counts.values())
    caught = sum(c["caught"] for c in counts.values())
    lines.append(f"| all | {everything} | {caught} | | | | {caught / everything:.1%} |\n")
    lines.append("## Not caught\n")
    for mutant, state in sorted(status.items()):
        if state not in CAUGHT:
            lines += [f"### `{mutant}` ({state})\n", "```diff", diff(mutant), "```\n"]
    Path(path).write_text("\n".join(lines))
    print(f"mutation score {caught / everything:.1%} over {everything} mutants; modules under {TARGET:.0%}: "
          f"{', '.join(failing) or 'none'}; written to {path}")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "docs/mutation.md"))
