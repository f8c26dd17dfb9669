#!/usr/bin/env bash
# Copyright: virtfleet contributors
# SPDX-License-Identifier: GPL-3.0-or-later
# Install the Debian packages that bindep.txt lists for [platform:dpkg] which are not installed yet.
# Idempotent and quiet when everything is there. Run as root on Debian 12.
set -euo pipefail
cd "$(dirname "$0")/../.."
mapfile -t wanted < <(awk '!/^#/ && /platform:dpkg/ {print $1}' bindep.txt)
missing=()
for pkg in "${wanted[@]}"; do
  status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
  [ "$status" = installed ] || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: missing Debian packages (run as root): ${missing[*]}" >&2
  exit 1
fi
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# No service may start from a package's maintainer scripts (openssh-server's would start sshd on 0.0.0.0:22;
# the lab runs its own on a loopback address): a policy-rc.d that refuses every start (101) for the time of the
# install, removed afterwards. A policy-rc.d the machine already has is left as it is.
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ] && [ ! -L "$policy" ]; then
  printf '#!/bin/sh\n# written by virtfleet install-deps for the time of an apt-get install\nexit 101\n' >"$policy"
  chmod 0755 "$policy"
  trap 'rm -f "$policy"' EXIT
fi
apt-get update -qq
# No recommends: they would pull in dnsmasq and a default NAT network the lab does not want.
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
