FROM busybox
RUN echo a \
    b \
    c > /out
