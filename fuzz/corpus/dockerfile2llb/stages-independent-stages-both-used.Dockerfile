FROM busybox AS a
RUN echo a > /a
FROM busybox AS b
RUN echo b > /b
FROM scratch
COPY --from=a /a /a
COPY --from=b /b /b
