#!/usr/bin/env bash
# Install PostgreSQL 15 (Debian bookworm) with pgvector 0.8.0 built from Debian's source package.
#
# Why: bookworm has no pgvector package, and the embedded pgserver's pgvector (0.6.2) lacks
# halfvec, sparsevec and iterative index scans. Debian trixie's source package of pgvector builds
# against bookworm's PostgreSQL 15 as it is: this script downloads it from the Debian archive,
# checks it against the sha256 sums of trixie's Sources index, applies Debian's patches (only
# `no-native`: no -march=native, so the library runs on any x86-64) and installs it into
# PostgreSQL 15. It does nothing when that version is already installed. Run as root (or with
# sudo available): it installs Debian packages and writes into /usr.
#
# Usage: deploy/install_pgvector.sh
set -euo pipefail

PG_MAJOR=15
VERSION=0.8.0
DEBIAN_REVISION=1
POOL=http://deb.debian.org/debian/pool/main/p/pgvector
ORIG_SHA256=867a2c328d4928a5a9d6f052cd3bc78c7d60228a9b914ad32aa3db88e9de27b0
DEBIAN_SHA256=6cb10bfdee32a093f0711a53d61f63657514d60058ff76a44ae2a4434f9c7ee5

SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
PG_CONFIG=/usr/lib/postgresql/$PG_MAJOR/bin/pg_config
CONTROL=/usr/share/postgresql/$PG_MAJOR/extension/vector.control

if [ -x "$PG_CONFIG" ] && [ -f "$CONTROL" ] \
  && grep -q "default_version = '$VERSION'" "$CONTROL" \
  && [ -f "$("$PG_CONFIG" --pkglibdir)/vector.so" ]; then
  exit 0
fi

packages=(postgresql-$PG_MAJOR postgresql-server-dev-$PG_MAJOR make gcc libc6-dev curl ca-certificates patch)
echo "installing PostgreSQL $PG_MAJOR and pgvector $VERSION (Debian source package)"
$SUDO apt-get install -y -q --no-install-recommends "${packages[@]}" >/dev/null \
  || { $SUDO apt-get update -q >/dev/null && \
       $SUDO apt-get install -y -q --no-install-recommends "${packages[@]}" >/dev/null; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
orig=pgvector_$VERSION.orig.tar.gz
debian=pgvector_$VERSION-$DEBIAN_REVISION.debian.tar.xz
curl -fsS -O "$POOL/$orig" -O "$POOL/$debian"
printf '%s  %s\n%s  %s\n' "$ORIG_SHA256" "$orig" "$DEBIAN_SHA256" "$debian" | sha256sum -c --quiet
tar xzf "$orig"
cd "pgvector-$VERSION"
tar xJf "../$debian"
while read -r patch; do
  case "$patch" in ''|'#'*) continue ;; esac
  patch -s -p1 < "debian/patches/$patch"
done < debian/patches/series
make -s -j"$(nproc)" PG_CONFIG="$PG_CONFIG" >/dev/null
$SUDO make -s install PG_CONFIG="$PG_CONFIG" >/dev/null
echo "pgvector $VERSION installed into PostgreSQL $PG_MAJOR"
