  FROM busybox
    RUN echo ok > /ok
