#!/usr/bin/env bash
# The restore action's work, from its inputs in INPUT_* variables: restores the entry
# of INPUT_KEY (or, on a miss, of the first INPUT_RESTORE_KEYS prefix that has one made
# from the same paths) into the INPUT_PATH lines, and writes cache-hit and
# cache-matched-key to GITHUB_OUTPUT. Errors of the cache are warnings unless
# INPUT_FAIL_ON_ERROR is true, as with actions/cache.
set -o pipefail
. "$(dirname "$0")/common.sh"

out cache-hit false
out cache-matched-key ""
install || exit $?
paths=()
while IFS= read -r p; do paths+=("$p"); done < <(path_lines "$INPUT_PATH")
[ ${#paths[@]} -gt 0 ] || { echo "::error::path is required" >&2; exit 2; }
fallbacks=()
while IFS= read -r k; do fallbacks+=("--fallback=$k"); done < <(lines "${INPUT_RESTORE_KEYS:-}")

if [ "${INPUT_LOOKUP_ONLY:-false}" = true ]; then
  # The exact key only: restore-keys would need a restore to be told apart.
  "$cacher" dir exists -- "$INPUT_KEY"
  rc=$?
  case $rc in
    0) out cache-hit true; out cache-matched-key "$INPUT_KEY" ;;
    1) ;;
    *) exit "$rc" ;;
  esac
  exit 0
fi
got=$("$cacher" dir download "${fallbacks[@]}" -- "$INPUT_KEY" "${paths[@]}")
rc=$?
case $rc in
  0)
    out cache-matched-key "$got"
    # The key as cacher spells it (with the arch suffix when one is configured).
    want=$("$cacher" key -- "$INPUT_KEY" 2>/dev/null) || want=$INPUT_KEY
    [ "$got" = "$want" ] && out cache-hit true
    ;;
  1) echo "no entry for $INPUT_KEY${fallbacks[*]:+ nor under the restore-keys}" ;;
  *) exit "$rc" ;;
esac
exit 0
