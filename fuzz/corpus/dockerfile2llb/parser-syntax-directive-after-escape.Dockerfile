# escape=`
# syntax=docker/dockerfile:1.7
FROM busybox
RUN echo ok `
  > /ok
