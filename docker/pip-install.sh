#!/bin/sh
# pip install inside an image build. Trusts the extra CA certificates found in /tmp/certs (docker/certs/) beside
# the image's own, and keeps no download cache in the image.
set -eu
if ls /tmp/certs/*.crt >/dev/null 2>&1; then
    cat /etc/ssl/certs/ca-certificates.crt /tmp/certs/*.crt > /tmp/ca-bundle.pem
    export PIP_CERT=/tmp/ca-bundle.pem
fi
exec python -m pip install --no-cache-dir --disable-pip-version-check "$@"
