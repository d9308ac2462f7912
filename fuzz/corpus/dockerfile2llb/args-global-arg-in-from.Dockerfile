ARG BASE=busybox
ARG TAG=latest
FROM $BASE:${TAG}
RUN echo ok > /ok
