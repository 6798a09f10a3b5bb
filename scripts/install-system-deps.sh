#!/usr/bin/env bash
# Installs the Debian packages msknode needs for the demo and the tests.
# Idempotent: does nothing when every package is already installed.
set -euo pipefail
PKGS="orthanc orthanc-dicomweb dcmtk dicom3tools redis-server postgresql chromium chromium-driver docker-compose openssl fonts-dejavu-core"
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "installing Debian packages:$missing"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing
fi
# The Debian packages start their services where an init system runs; msknode starts
# its own instances on loopback, so stop any that would hold the default ports.
for svc in orthanc redis-server postgresql; do
  if command -v service >/dev/null 2>&1 && service "$svc" status >/dev/null 2>&1; then
    service "$svc" stop >/dev/null 2>&1 || true
  fi
done
exit 0
