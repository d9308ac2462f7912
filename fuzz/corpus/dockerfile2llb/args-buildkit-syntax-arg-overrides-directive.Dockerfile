# syntax=example.com/fe:1
FROM busybox
RUN echo ok > /ok
