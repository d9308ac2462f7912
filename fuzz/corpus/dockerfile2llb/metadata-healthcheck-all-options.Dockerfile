FROM busybox
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --start-interval=2s --retries=4 CMD wget -q localhost
