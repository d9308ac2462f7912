FROM --platform=$BUILDPLATFORM busybox
RUN echo ok > /ok
