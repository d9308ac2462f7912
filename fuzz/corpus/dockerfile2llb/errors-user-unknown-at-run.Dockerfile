FROM busybox
USER nosuchuser
RUN true
