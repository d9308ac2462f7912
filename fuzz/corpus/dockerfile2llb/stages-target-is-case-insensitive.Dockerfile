FROM busybox AS Builder
RUN echo b > /which
FROM busybox
RUN echo last > /which
