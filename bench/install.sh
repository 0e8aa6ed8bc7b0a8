#!/bin/sh
# Install what the benchmark needs: Postfix's smtp-source (load generator) and
# smtp-sink (C reference server), aiosmtpd, and the Node.js peers Haraka and
# nodemailer's smtp-server. Idempotent; CI runs it (.ci/run).
#
# Postfix is installed as a package only: debconf is preseeded with
# "No configuration", service start-up is denied while apt runs, and any
# Postfix master process is stopped afterwards. Nothing listens on port 25.
#
# Haraka and smtp-server are installed with `npm ci` from bench/package.json
# and bench/package-lock.json (exact versions) into bench/node_modules, which
# git ignores. That needs Node.js >= 20 and npm, which this script does not
# install (Debian 12's nodejs is 18): without them it says so and goes on, and
# bench/run.py leaves those two servers out with a note in its report.
set -eu

BENCH_DIR=$(cd "$(dirname "$0")" && pwd)

if [ "$(id -u)" -ne 0 ]; then
    SUDO=sudo
else
    SUDO=
fi

if ! command -v smtp-source >/dev/null 2>&1 && [ ! -x /usr/sbin/smtp-source ]; then
    echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
    echo "postfix postfix/mailname string localhost" | $SUDO debconf-set-selections

    # Deny service start-up during the install unless a policy already does.
    made_policy=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
        $SUDO chmod 755 /usr/sbin/policy-rc.d
        made_policy=1
    fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends postfix \
        || { [ -n "$made_policy" ] && $SUDO rm -f /usr/sbin/policy-rc.d; exit 1; }
    if [ -n "$made_policy" ]; then
        $SUDO rm -f /usr/sbin/policy-rc.d
    fi
fi

# Make sure no mail system was left running (a no-op when none is).
if [ -x /usr/sbin/postfix ] && $SUDO /usr/sbin/postfix status >/dev/null 2>&1; then
    $SUDO /usr/sbin/postfix stop >/dev/null 2>&1 || true
fi
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now postfix >/dev/null 2>&1 || true
fi

python -c "import aiosmtpd" 2>/dev/null || python -m pip install -q "aiosmtpd>=1.4.6"

echo "bench/install.sh: smtp-source at $(command -v smtp-source || echo /usr/sbin/smtp-source)"

install_node_peers() {
    if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
        echo "bench/install.sh: node or npm not found: Haraka and smtp-server NOT installed" \
            "(install Node.js >= 20 with npm, then run bench/install.sh again)"
        return 0
    fi
    major=$(node -p 'process.versions.node.split(".")[0]')
    if [ "$major" -lt 20 ]; then
        echo "bench/install.sh: node $(node --version) is older than 20:" \
            "Haraka and smtp-server NOT installed"
        return 0
    fi
    modules="$BENCH_DIR/node_modules"
    stamp="$modules/.bonzo-bench-package-lock.json"
    if [ -f "$stamp" ] && cmp -s "$stamp" "$BENCH_DIR/package-lock.json" \
        && [ -f "$modules/Haraka/package.json" ] && [ -f "$modules/smtp-server/package.json" ]; then
        echo "bench/install.sh: Haraka and smtp-server present in $modules"
        return 0
    fi
    # Exact versions from the lockfile; no optional dependencies (Haraka lists
    # ~30 plugins as optional: none is used) and no install scripts (none is
    # needed: nothing native is built).
    (cd "$BENCH_DIR" && npm ci --omit=optional --ignore-scripts --no-audit --no-fund \
        --loglevel=error)
    cp "$BENCH_DIR/package-lock.json" "$stamp"
    echo "bench/install.sh: Haraka $(node -p "require('$modules/Haraka/package.json').version")" \
        "and smtp-server $(node -p "require('$modules/smtp-server/package.json').version")" \
        "installed in $modules (node $(node --version))"
}
install_node_peers
