#!/usr/bin/env bash
# Install Prometheus + promtool (Debian package) for tests/e2e/test_prometheus.py.
#
# Idempotent: does nothing but print versions when both binaries are already on PATH.
# The Debian package would normally start a system `prometheus` service on :9090; this
# script blocks service starts during the install (policy-rc.d), then stops and disables
# the service if anything started it anyway. The test runs its own Prometheus on a free
# port with a temporary storage dir, so no system service is needed.
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1; }

SUDO=""
if [ "$(id -u)" != 0 ]; then
  have sudo || { echo "install-prometheus: need root or sudo" >&2; exit 1; }
  SUDO="sudo"
fi

if have prometheus && have promtool; then
  echo "install-prometheus: already installed"
else
  # Forbid invoke-rc.d from starting services while the package installs.
  created_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d
    created_policy=1
  fi
  cleanup() { [ "$created_policy" = 1 ] && $SUDO rm -f /usr/sbin/policy-rc.d; true; }
  trap cleanup EXIT

  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    prometheus >/dev/null

  cleanup
  trap - EXIT
fi

# If a system service got started anyway (hosts with systemd, or an older install), stop it
# so that it does not hold :9090 or a TSDB lock. Failures here are harmless.
if have systemctl && [ -d /run/systemd/system ]; then
  $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
elif [ -x /etc/init.d/prometheus ]; then
  $SUDO /etc/init.d/prometheus stop >/dev/null 2>&1 || true
fi

prometheus --version 2>&1 | head -n 1
promtool --version 2>&1 | head -n 1
