FROM --platform=linux/amd64 busybox
RUN echo ok > /ok
