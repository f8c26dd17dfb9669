# Copyright: virtfleet contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""Stand-in for get-pip.py, the script ansible-test downloads to put pip into its sanity virtualenvs.

This workplace reaches PyPI but not the host ansible-test downloads get-pip.py from, so tests/sanity/run.sh
places this file in ansible-test's cache instead. It does what get-pip.py does, from the standard library:
ensurepip puts a pip into the environment, then that pip installs the requested packages from PyPI.
ansible-test runs pip with a reduced environment (no PIP_CERT, no SSL_CERT_FILE), so the virtualenv gets a
pip.conf that points pip at the system's CA bundle, which is what the rest of the machine trusts.
"""

import ensurepip
import os
import subprocess
import sys

SYSTEM_CA = "/etc/ssl/certs/ca-certificates.crt"

if os.path.exists(SYSTEM_CA):
    with open(os.path.join(sys.prefix, "pip.conf"), "w") as conf:
        conf.write(f"[global]\ncert = {SYSTEM_CA}\n")

# get-pip.py options that are not pip options
args = [arg for arg in sys.argv[1:] if arg not in ("--no-setuptools", "--no-wheel")]
ensurepip.bootstrap(upgrade=True)
os.environ.pop("PIP_CONFIG_FILE", None)  # ensurepip points it at /dev/null for its own run
sys.exit(subprocess.call([sys.executable, "-m", "pip", "install", *args]))
