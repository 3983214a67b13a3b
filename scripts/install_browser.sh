#!/bin/sh
# Debian's chromium for the browser test (tests/test_app_browser.py drives it with Playwright for Python).
# Idempotent: does nothing when /usr/bin/chromium exists. Never runs `playwright install` (no browser downloads
# outside the Debian registry). When it cannot install (no root, no apt-get, no network) it says so and exits 0:
# the browser test then skips with the reason, and the rest of `make test` runs.
set -u

if [ -x /usr/bin/chromium ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_browser.sh: no apt-get here; install chromium at /usr/bin/chromium to run the browser test" >&2
    exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
else
    echo "install_browser.sh: needs root to run 'apt-get install chromium'; the browser test will be skipped" >&2
    exit 0
fi

echo "install_browser.sh: installing Debian's chromium (once)"
if $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; then
    exit 0
fi
echo "install_browser.sh: 'apt-get install chromium' failed; the browser test will be skipped" >&2
exit 0
