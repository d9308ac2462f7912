FROM busybox
RUN echo x > /x
