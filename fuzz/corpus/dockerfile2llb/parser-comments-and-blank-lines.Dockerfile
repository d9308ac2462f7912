# leading comment

FROM busybox
   # indented comment

RUN echo ok > /ok
