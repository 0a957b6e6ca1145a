#!/usr/bin/env bash
# The save action's work, from its inputs in INPUT_* variables: uploads the INPUT_PATH
# lines as one entry under INPUT_KEY without what the INPUT_EXCLUDE lines match (only
# the chunks the bucket lacks; skipped when the key is cached) and writes
# saved=true|false to GITHUB_OUTPUT. Errors of the cache are warnings unless
# INPUT_FAIL_ON_ERROR is true, as with actions/cache.
set -o pipefail
. "$(dirname "$0")/common.sh"

out saved false
paths=()
while IFS= read -r p; do paths+=("$p"); done < <(path_lines "$INPUT_PATH")
[ ${#paths[@]} -gt 0 ] || { echo "::error::path is required" >&2; exit 2; }
# A restore needs every path the entry was made from: one that is missing (a build
# that failed early) means no save, as actions/cache saves nothing when no path exists.
for p in "${paths[@]}"; do
  if [ ! -e "$p" ]; then
    echo "::warning::$p does not exist; not saving $INPUT_KEY"
    exit 0
  fi
done
excludes=()
while IFS= read -r e; do excludes+=("--exclude=$e"); done < <(lines "${INPUT_EXCLUDE:-}")
install || exit $?
result=$("$cacher" --json dir upload "${excludes[@]}" -- "$INPUT_KEY" "${paths[@]}")
rc=$?
[ $rc -eq 0 ] || exit "$rc"
case $result in
  *'"result":"uploaded"'*) out saved true ;;
esac
exit 0
