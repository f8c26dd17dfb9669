#!/usr/bin/env bash
# Copyright: virtfleet contributors
# SPDX-License-Identifier: GPL-3.0-or-later
# Print the interpreter `make` builds the project's venv with: the newest CPython 3.13 or 3.12 found (on PATH,
# else under pyenv) that runs and has ssl and venv, else python3.
# Why: ansible-core 2.20 and later need Python 3.12+, and ansible-core 2.21 on Python 3.13 builds a large
# inventory ~10% faster than 2.19 on 3.11 (docs/benchmarks.md). Python 3.11 (Debian 12's) still works, with 2.19.
set -uo pipefail
root=${PYENV_ROOT:-$HOME/.pyenv}
for minor in 3.13 3.12; do
  # pyenv's shims answer for versions that are installed but not selected, with an error: run each candidate.
  candidates=("python$minor")
  mapfile -t -O 1 candidates < <(ls -d "$root"/versions/"$minor".*/bin/python"$minor" 2>/dev/null | sort -rV)
  for candidate in "${candidates[@]}"; do
    if "$candidate" -c 'import ssl, sys, venv; assert sys.version_info >= (3, 12)' >/dev/null 2>&1; then
      echo "$candidate"
      exit 0
    fi
  done
done
echo python3
