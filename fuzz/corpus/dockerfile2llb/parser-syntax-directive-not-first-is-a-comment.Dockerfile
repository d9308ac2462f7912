FROM busybox
# syntax=example.com/frontend:1
RUN echo ok > /ok
