FROM --platform=$TARGETPLATFORM busybox
RUN echo ok > /ok
