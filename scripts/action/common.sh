# Shared by restore.sh and save.sh (sourced): settings from the inputs, the install,
# and the outputs.

# INPUT_* settings become CACHER_* ones; the credentials come from the job's env.
[ -n "${INPUT_ENDPOINT:-}" ] && export CACHER_ENDPOINT=$INPUT_ENDPOINT
[ -n "${INPUT_REGION:-}" ] && export CACHER_REGION=$INPUT_REGION
[ -n "${INPUT_BUCKET:-}" ] && export CACHER_BUCKET=$INPUT_BUCKET
[ -n "${INPUT_PREFIX:-}" ] && export CACHER_PREFIX=$INPUT_PREFIX
if [ "${INPUT_FAIL_ON_ERROR:-false}" = true ]; then
  export CACHER_ON_ERROR=strict
else
  export CACHER_ON_ERROR=warn
fi

# Writes output NAME=VALUE for the action.
out() { echo "$1=$2" >> "${GITHUB_OUTPUT:-/dev/null}"; }

# The non-empty lines of $1, trimmed, one per line (read them with `while read`: bash
# 3.2, macOS's, has no mapfile or namerefs).
lines() {
  local line
  while IFS= read -r line; do
    line="${line#"${line%%[![:space:]]*}"}"
    line="${line%"${line##*[![:space:]]}"}"
    [ -n "$line" ] || continue
    printf '%s\n' "$line"
  done <<< "$1"
}

# The lines of $1 as paths: as `lines`, with a leading ~ expanded.
path_lines() {
  local line
  while IFS= read -r line; do
    case $line in "~") line=$HOME ;; "~/"*) line="$HOME/${line#"~/"}" ;; esac
    printf '%s\n' "$line"
  done < <(lines "$1")
}

# Sets $cacher to the installed binary; a failed download is a warning unless
# fail-on-error (exit 0 then: the job goes on without the cache).
install() {
  local dir rc
  dir=$("$(dirname "${BASH_SOURCE[0]}")/install.sh")
  rc=$?
  # 3: a release that does not match its checksums (or no release for this runner):
  # never softened. Anything else (no network, an unwritable tool cache) is the cache's.
  if [ $rc -ne 0 ] && [ $rc -ne 3 ] && [ "$CACHER_ON_ERROR" = warn ]; then
    echo "::warning::cacher could not be installed; going on without the cache"
    exit 0
  fi
  [ $rc -eq 0 ] || return $rc
  cacher="$dir/cacher"
}
