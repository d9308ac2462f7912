FROM busybox
RUN echo a \

    b > /out
