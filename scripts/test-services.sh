#!/usr/bin/env bash
# What the test suite needs beyond Python packages: the PostgreSQL server on loopback and
# Debian's Chromium for the browser tests. Idempotent; safe to run on every `make test`.
set -u
if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
  if command -v pg_ctlcluster >/dev/null 2>&1; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  fi
fi
if ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
      || echo "test-services: could not install chromium; browser tests will fail" >&2
  fi
fi
exit 0
