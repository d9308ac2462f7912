FROM busybox
USER user
RUN whoami > /tmp/who
