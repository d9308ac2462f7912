FROM busybox AS first
COPY --from=second /x /x
FROM busybox AS second
RUN echo > /x
FROM first
