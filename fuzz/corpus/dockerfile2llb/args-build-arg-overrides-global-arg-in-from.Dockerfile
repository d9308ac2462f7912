ARG TAG=doesnotexist
FROM busybox:$TAG
RUN echo ok > /ok
