#!/usr/bin/env bash
# Test setup: Debian's `chromium` for tests/integration/test_mlflow_ui.py (a real browser on the
# MLflow UI). Installed here, by the setup (README's test command, .ci/run), never from inside a
# test. Nothing to do when a `chromium` is on PATH; otherwise apt-get, as root or password-less sudo.
set -euo pipefail
command -v chromium >/dev/null && exit 0
if ! command -v apt-get >/dev/null; then
  echo "tests/install_browser.sh: no chromium and no apt-get: install a Chromium whose binary is called \`chromium\`" >&2
  exit 2
fi
if [ "$(id -u)" = 0 ]; then sudo=(); elif sudo -n true 2>/dev/null; then sudo=(sudo -n); else
  echo "tests/install_browser.sh: installing chromium needs root or password-less sudo: run \`sudo apt-get install -y --no-install-recommends chromium\`" >&2
  exit 2
fi
apt=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=300)
policy=$(apt-cache policy chromium 2>/dev/null || true)
if ! grep -q "Candidate:" <<<"$policy" || grep -q "Candidate: (none)" <<<"$policy"; then
  "${apt[@]}" update >/dev/null  # no package lists (yet) for chromium
fi
if ! "${apt[@]}" install -y --no-install-recommends chromium >/dev/null; then
  "${apt[@]}" update >/dev/null  # stale lists: the mirror moved on
  "${apt[@]}" install -y --no-install-recommends chromium >/dev/null
fi
command -v chromium >/dev/null
