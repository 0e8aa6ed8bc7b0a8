#!/bin/sh
# Install what the benchmark needs: Postfix's smtp-source (load generator) and
# smtp-sink (C reference server), plus aiosmtpd. Idempotent; CI runs it.
#
# Postfix is installed as a package only: debconf is preseeded with
# "No configuration", service start-up is denied while apt runs, and any
# Postfix master process is stopped afterwards. Nothing listens on port 25.
set -eu

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
