FROM busybox
HEALTHCHECK --interval=30s --timeout=5s --start-period=1s --retries=3 CMD wget -q http://x || exit 1
