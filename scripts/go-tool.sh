#!/usr/bin/env bash
# go-tool.sh DEST PACKAGE@VERSION: put the Go tool PACKAGE at VERSION at DEST (in the git-ignored
# .tools/bin), idempotently and quickly on the second run.
#
# DEST is left alone when `go version -m` says it is that package at that version. Otherwise the
# binary comes from a cache outside the clone, keyed by package, version and Go toolchain
# ($TOOLS_CACHE, default ~/.cache/pricestream-tools, like the e2e cache): a fresh
# clone copies it instead of relinking (helm alone took 32 s to relink on a warm Go build cache).
# Only a miss runs `go install`, into a temporary folder, moved into the cache when complete.
set -euo pipefail
dest="$1"
spec="$2"
pkg="${spec%@*}"
version="${spec##*@}"
[ "$pkg" != "$spec" ] && [ -n "$version" ] || { echo "usage: $0 DEST PACKAGE@VERSION" >&2; exit 2; }
command -v go >/dev/null || { echo "go-tool.sh: no go on PATH (needed to build $spec)" >&2; exit 1; }

is_built() { # is_built FILE: FILE is $pkg at $version
  [ -x "$1" ] && go version -m "$1" 2>/dev/null |
    awk -v p="$pkg" -v v="$version" '$1 == "path" && $2 == p { a = 1 } $1 == "mod" && $3 == v { b = 1 }
      END { exit !(a && b) }'
}

is_built "$dest" && exit 0
name="$(basename "$dest")"
cache="${TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pricestream-tools}"
entry="$cache/$name-$version-$(go env GOVERSION)"
if ! is_built "$entry/$name"; then
  echo "building $spec (a miss in $cache)"
  mkdir -p "$cache"
  tmp="$(mktemp -d "$cache/.build-$name.XXXXXX")"
  trap 'rm -rf "$tmp"' EXIT
  GOBIN="$tmp" nice -n 10 go install "$spec"
  [ -x "$tmp/$name" ] || { echo "go install $spec made no $name" >&2; exit 1; }
  rm -rf "$entry"
  mv "$tmp" "$entry"
fi
mkdir -p "$(dirname "$dest")"
install -m 0755 "$entry/$name" "$dest.tmp.$$"
mv -f "$dest.tmp.$$" "$dest"
echo "$name $version: from $entry"
