FROM busybox
ENTRYPOINT ["/bin/echo"]
