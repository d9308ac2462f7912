FROM busybox
ENV SSH_AUTH_SOCK=/custom.sock
RUN --mount=type=ssh echo "$SSH_AUTH_SOCK" > /out
