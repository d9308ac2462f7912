# syntax=docker/dockerfile:1-labs
FROM busybox
RUN echo ok > /ok
