FROM busybox
RUN echo zero > /z
FROM busybox
COPY --from=0 /z /z
