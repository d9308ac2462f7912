FROM busybox
RUN echo $HTTP_PROXY > /p
