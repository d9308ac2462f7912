FROM busybox
COPY http://example.com/x /x
