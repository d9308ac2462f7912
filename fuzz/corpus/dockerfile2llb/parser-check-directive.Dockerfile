# check=skip=all
FROM busybox
RUN echo ok > /ok
