#!/usr/bin/env bash
# The system packages `make test` needs, installed with apt-get when run as root; elsewhere one line on what is missing.
#
# Headless Chromium and its driver (Debian: chromium chromium-driver) for tests/test_dashboard_browser.py, and
# PostgreSQL (Debian: postgresql) for the store and API tests' throwaway server (tests/postgres.py). Never fails:
# the tests themselves decide what a missing package means, and the line printed here says what they will do.
set -uo pipefail

# Sets `missing` to the Debian packages whose programs are not found.
find_missing() {
  missing=()
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
  # where tests/postgres.py looks for initdb: Debian keeps it out of PATH, under /usr/lib/postgresql/VERSION/bin
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null 2>&1 || missing+=(postgresql)
}
find_missing
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  reason="not root, so not installed"
elif ! command -v apt-get >/dev/null 2>&1; then
  reason="no apt-get, so not installed"
else
  echo "install_system_deps: apt-get install ${missing[*]}"
  log=$(mktemp)
  if (export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && apt-get install -y -qq "${missing[@]}") >"$log" 2>&1
  then
    reason="installed by apt-get, yet not found"
  else
    tail -n 3 "$log" >&2
    reason="apt-get failed"
  fi
  rm -f "$log"
  find_missing
  [ ${#missing[@]} -eq 0 ] && exit 0
fi

# What the tests do without each package: the browser fixture fails; the PostgreSQL fixture skips, or fails
# under OMI_REQUIRE_POSTGRES=1 (.ci/run).
effects=()
[[ " ${missing[*]} " == *" chromium"* ]] && effects+=("tests/test_dashboard_browser.py fails")
if [[ " ${missing[*]} " == *" postgresql "* ]]; then
  verb=skip
  [ "${OMI_REQUIRE_POSTGRES:-}" = 1 ] && verb="fail (OMI_REQUIRE_POSTGRES=1)"
  effects+=("the PostgreSQL cases of tests/test_coordinator.py and tests/test_dashboard_api.py $verb")
fi
joined=$(printf '%s; ' "${effects[@]}")
echo "install_system_deps: missing Debian packages ${missing[*]} ($reason): ${joined%; }"
