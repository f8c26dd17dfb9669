#!/usr/bin/env bash
# Copyright: virtfleet contributors
# SPDX-License-Identifier: GPL-3.0-or-later
# ansible-test sanity on the collection copy in .build (made by `make collection`).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
venv="$repo/.venv"
# ansible-test bootstraps pip in its virtualenvs with a downloaded get-pip.py; provide it from the stdlib.
pip_version=$("$venv/bin/python" - <<'PY'
import re, ansible_test, pathlib
src = pathlib.Path(ansible_test.__file__).parent / "_internal" / "python_requirements.py"
print(re.search(r"pip='([0-9.]+)'", src.read_text()).group(1))
PY
)
cache="$HOME/.ansible/test/cache"
mkdir -p "$cache"
install -m 0644 "$repo/tests/sanity/get_pip_shim.py" "$cache/get_pip_${pip_version//./_}.py"
cd "$repo/.build/ansible_collections/virtfleet/core"
pyver=$("$venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
exec "$venv/bin/ansible-test" sanity --venv --python "$pyver" --color no "$@"
