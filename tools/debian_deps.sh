#!/usr/bin/env bash
# Installs the Debian packages Loom's tests need, only those missing.
#   espeak-ng, sox        speech test inputs (tests/media.py)
#   fonts-dejavu-core     a font for the OCR test images
#   libsndfile1           soundfile's decoder (the wheel bundles one; this is the system fallback)
#   prometheus            promtool, which checks and unit-tests deploy/monitoring's config and alert rules
#   chromium              a headless browser for the dashboard test
#   iproute2              ip netns and veth links for the multi-host test
set -euo pipefail
packages=(espeak-ng sox fonts-dejavu-core libsndfile1 prometheus chromium iproute2)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "installing Debian packages: ${missing[*]}"
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
# A fresh image has empty package lists: update only when the install cannot find a package.
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null 2>&1 || {
  $SUDO apt-get update -q >/dev/null
  $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
}
