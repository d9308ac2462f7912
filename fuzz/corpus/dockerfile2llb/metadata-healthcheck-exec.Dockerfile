FROM busybox
HEALTHCHECK CMD ["/bin/check", "-q"]
