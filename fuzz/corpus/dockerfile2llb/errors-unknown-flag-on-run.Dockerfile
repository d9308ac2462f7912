FROM busybox
RUN --foo=bar true
